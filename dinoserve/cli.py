"""``dinoserve``: one command line for training, export, evaluation and serving.

The trainer's commands (``train``, ``export``, ``eval-knn``, ``plot``, ``bench-methods``) exist where the
``training`` package is installed, and import torch only when they run; the gateway's (``serve``, ``index``)
import ``service`` only. So the gateway image, which holds neither torch nor ``training``, runs
``dinoserve serve``. A command-line or configuration
error is one line on stderr, naming the option or setting, and exit status 2; a command that fails while it
runs exits with status 1.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from dataclasses import fields
from pathlib import Path

from core.knn import DEFAULT_TEMPERATURE
from service.index_cli import add_index_parser, run_index


class Parser(argparse.ArgumentParser):
    """argparse's parser with its errors in one line (no usage block above them), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def config_error(command: str, message: object) -> SystemExit:
    """A configuration error of ``dinoserve COMMAND``: printed as one line; raise what this returns."""
    print(f"dinoserve {command}: {message}", file=sys.stderr)
    return SystemExit(2)


TRAIN_HELP = {
    "method": "self-supervised objective: dino, ibot, or the methods DINO grew out of (mocov3, simclr, byol, "
              "simsiam, swav: two global views each, SwAV also the local crops)",
    "arch": "ViT size: vit_nano / vit_micro (CPU and tests), vit_tiny, vit_small, vit_base, vit_large",
    "patch_size": "patch side in pixels; 8 gives finer attention maps at 4x the cost of 16",
    "stem": "patch: the ViT's patch projection (official); conv: a convolutional stem of the same stride (Xiao et "
            "al. 2021), same token grid and bundle; edges: that stem fed a fixed colour-blind edge map of the "
            "image; conv and edges need a power-of-two patch size >= 4",
    "img_size": "size whose patch grid the position embeddings are stored at; others are interpolated",
    "data": "image folder (class sub-folders give labels) or synthetic:N[:SIZE[:SEED[:BACKGROUNDS[:CLASSES]]]]",
    "output": "run directory: checkpoint.pth (resumable), teacher_backbone.pth (backbone.pth for the methods "
              "other than dino/ibot), log.jsonl, config.json",
    "lr": "peak learning rate for a batch of 256, scaled linearly with the batch size",
    "out_dim": "prototypes in the DINO head; 65536 in the paper, smaller for small data",
    "teacher_temp": "teacher sharpening temperature after warm-up; above 0.07 was unstable in the paper",
    "warmup_teacher_temp": "initial teacher temperature; lower it if the loss does not decrease early",
    "momentum_teacher": "EMA rate of the teacher (DINO, iBOT) or momentum encoder (MoCo v3: 0.99, BYOL: 0.996), "
                        "raised to 1 by a cosine; 0.9995 helps small batches",
    "norm_last_layer": "fix the prototypes' weight-norm gain; true is more stable, false can be better for ViT-S",
    "clip_grad": "per-parameter gradient norm cap (0 disables); helps ViTs train stably",
    "freeze_last_layer": "epochs during which the prototypes do not move; stabilises the start",
    "drop_path_rate": "stochastic depth of the student",
    "curriculum_epochs": "synthetic data: start with plain white shapes on black, centred, and reach the generator's "
                         "sizes, positions, colours and backgrounds after this many epochs; new images every epoch "
                         "(0: off)",
    "local_crops_number": "small crops per image; the student must match the teacher's global views from them",
    "num_workers": "data-loading processes; augmentation is CPU-heavy",
    "patch_out_dim": "iBOT: prototypes for the patch tokens",
    "shared_head": "iBOT: CLS and patch tokens share their prototypes (the official ViT-S/B recipes do)",
    "shared_head_teacher": "iBOT: the teacher's CLS and patch tokens share their prototypes (main_ibot.py's "
                           "default; needs patch_out_dim = out_dim)",
    "pred_ratio": "iBOT: masking ratios, one drawn per global crop; '0 0.3' masks half of the crops",
    "pred_ratio_var": "iBOT: +/- range around each masking ratio",
    "pred_start_epoch": "iBOT: epoch from which crops are masked and the patch loss warms up",
    "hidden_dim": "hidden width of the head's MLPs (DINO/iBOT head; projector and predictor of the other methods)",
    "bottleneck_dim": "DINO/iBOT head bottleneck; output width of the other methods' projector (256 in MoCo v3 "
                      "and BYOL, 128 in SimCLR and SwAV, 2048 in SimSiam)",
    "mlp_bn": "mocov3/simclr/byol/simsiam/swav: BatchNorm in the projection and prediction MLPs; without it "
              "BYOL's embeddings collapse",
    "moco_temperature": "mocov3: InfoNCE temperature (0.2 in the paper's ViT recipes)",
    "queue_size": "mocov3: also use this many past keys as negatives, MoCo v2's queue, for small batches (0: off)",
    "freeze_patch_embed": "mocov3 (and the other non-DINO methods): fixed random patch projection, the MoCo v3 "
                          "paper's cure for ViT training instability",
    "simclr_temperature": "simclr: NT-Xent temperature; lower (0.1) suits large batches",
    "swav_temperature": "swav: softmax temperature of the swapped prediction",
    "swav_prototypes": "swav: number of prototypes (3000 for ImageNet; fewer for small data)",
    "sinkhorn_epsilon": "swav: entropy regularisation of the Sinkhorn codes; larger is softer, too large collapses",
    "sinkhorn_iterations": "swav: Sinkhorn-Knopp iterations per step (3 suffice for equipartition)",
    "freeze_prototypes_iters": "swav: steps during which the prototypes do not move; stabilises the start",
    "device": "auto (CUDA when available), cpu, cuda, cuda:N",
    "precision": "auto: fp16 autocast with a grad scaler on GPUs (the official recipes), fp32 on CPU; bf16 on request",
    "saveckp_freq": "also keep checkpoint<epochs done>.pth every N epochs (0: only checkpoint.pth)",
    "resume": "checkpoint.pth to continue from (default: the output directory's, when it exists)",
    "tensorboard": "write TensorBoard events to RUN_DIR/tensorboard (needs the tensorboard package)",
    "knn_every": "run a k-NN monitor of the teacher every N epochs on --knn-train / --knn-val (0: off)",
    "knn_size": "crop size of the k-NN monitor's evaluation transform (0: the global crop size)",
}


def _trainer_config():
    """``training.config`` (torch-free), or None where the trainer is not installed (the gateway image)."""
    try:
        from training import config
    except ModuleNotFoundError as error:
        if error.name != "training":
            raise
        return None
    return config


def _add_train(sub, config) -> None:
    PRESETS, TrainConfig = config.PRESETS, config.TrainConfig
    p = sub.add_parser("train", help="train a ViT with DINO, iBOT, MoCo v3, SimCLR, BYOL, SimSiam or SwAV",
                       description="Train a ViT backbone with DINO, iBOT, MoCo v3, SimCLR, BYOL, SimSiam or SwAV, "
                                   "in one process or under torchrun "
                                   "(DDP: NCCL on GPUs, gloo on CPUs). Options: preset < config file < "
                                   "command line.")
    p.add_argument("--config", type=Path, help="JSON, TOML or YAML file of options; command-line options win")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="the official recipe of a released model (per-process batch; the papers used 16-32 GPUs)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        kwargs = {"help": f"{TRAIN_HELP.get(f.name, f.name.replace('_', ' '))} (default: {default})",
                  "default": None}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name in ("pred_ratio", "pred_ratio_var"):
            kwargs.update(nargs="+", type=float)
        elif isinstance(default, tuple):
            kwargs.update(nargs=2, type=float, metavar=("MIN", "MAX"))
        else:
            kwargs["type"] = type(default)
        p.add_argument(flag, **kwargs)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="checkpoint or hub name → Triton model bundle",
                       description="Export a DINO / iBOT / timm ViT checkpoint to a Triton model-repository "
                                   "entry with a model card; the architecture is read from the weights.")
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_HUB_NAME",
                   help="our checkpoint.pth / teacher_backbone.pth, an official DINO or iBOT file (release or "
                        "full training checkpoint), a timm ViT .pth / .safetensors, or a hub name downloaded "
                        "once: dino_vits16, dino_vits8, dino_vitb16, dino_vitb8, ibot_vits16, ibot_vitb16, "
                        "ibot_vitl16")
    p.add_argument("--repository", type=Path, required=True, help="Triton model repository directory")
    p.add_argument("--name", required=True, help="model name (directory and Triton model name)")
    p.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx",
                   help="onnx (any machine), or an FP16 TensorRT engine (needs tensorrt and an NVIDIA GPU)")
    p.add_argument("--checkpoint-key", choices=["teacher", "student"], default="teacher",
                   help="which network of a training checkpoint; the papers report the teacher")
    p.add_argument("--num-heads", type=int,
                   help="attention heads, for widths other than 192/384/768/1024 (3/6/12/16 heads)")
    p.add_argument("--pos-interpolation", choices=["official", "timm"],
                   help="position-embedding resize at other sizes: the official DINO/iBOT code's or timm's "
                        "(default: official for DINO/iBOT files and ours, timm for timm files; docs/bundle.md)")
    p.add_argument("--method", choices=["dino", "ibot"],
                   help="training method recorded in the model card (default: read from the file)")
    p.add_argument("--cache-dir", type=Path,
                   help="where hub downloads are kept (default: $DINOSERVE_CACHE_DIR or ~/.cache/dinoserve)")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                   help="ONNX arithmetic: fp32, or fp16 weights and compute for GPUs (inputs and outputs stay "
                        "fp32; verified by the embedding's cosine to fp32 >= 0.999); TensorRT engines are fp16")
    p.add_argument("--version", type=int,
                   help="version folder to write (default: one past the newest, 1 for a new model, so a new "
                        "export rolls out next to the old one; Triton serves the newest)")
    p.add_argument("--max-batch-size", type=int, default=64, help="Triton max_batch_size")
    p.add_argument("--max-queue-size", type=int, default=256,
                   help="requests Triton's batcher holds before refusing more (bounded queue)")
    p.add_argument("--instances", type=int, default=1, help="model instances per device in Triton")
    p.add_argument("--queue-delay-us", type=int, default=2000,
                   help="Triton dynamic batcher's max queue delay; trades latency for batch size")
    p.add_argument("--crop", type=int, default=224,
                   help="the model card's embedding input: centre crop side; a model trained on smaller crops is "
                        "served best at its training crop (default: 224, DINO's)")
    p.add_argument("--resize", type=int,
                   help="the model card's resize of the shorter side before the crop (default: crop x 256/224)")
    p.add_argument("--segmentation-size", type=int, default=480,
                   help="the model card's default /v1/segment input side (shorter side; default: 480, DINO's)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="run the exported file at three sizes and compare with PyTorch; fail on a mismatch")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_eval_knn(sub) -> None:
    p = sub.add_parser("eval-knn", help="weighted k-NN accuracy of a checkpoint or bundle",
                       description="Classify labelled val images by their nearest train images in feature "
                                   "space (DINO's weighted k-NN) and print top-1 / top-5 per k.")
    p.add_argument("model", type=Path, metavar="MODEL_OR_CHECKPOINT",
                   help="checkpoint.pth or teacher_backbone.pth from `dinoserve train`, or a model "
                        "directory written by `dinoserve export` (run in onnxruntime)")
    p.add_argument("--train", required=True,
                   help="labelled images the neighbours are drawn from: a folder with class sub-folders "
                        "or synthetic:N[:SIZE[:SEED]]")
    p.add_argument("--val", required=True, help="labelled images to classify, same classes as --train")
    p.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200],
                   help="neighbour counts; 20 is the paper's headline, values above the number of train "
                        "images are clamped to it (default: 10 20 100 200)")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help="T in the vote weight exp(cosine / T); lower trusts the closest neighbours more "
                        "(default: 0.07, the paper's)")
    p.add_argument("--checkpoint-key", choices=["teacher", "student"], default="teacher",
                   help="which network of a training checkpoint; the papers report the teacher")
    p.add_argument("--random-init", action="store_true",
                   help="also evaluate the same architecture at random initialisation, the baseline "
                        "that learning must beat")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default: 0)")
    p.add_argument("--size", type=int, default=224,
                   help="crop size for checkpoints (resize size x 8/7, centre crop); use the training crop "
                        "size for models trained on small crops; bundles use their model card (default: 224)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="start the HTTP gateway (and an embedded Triton)",
                       description="Serve a model bundle over HTTP. Every option is a field of the gateway's "
                                   "settings (service/settings.py, which checks its value) and also reads "
                                   "DINOSERVE_<OPTION>; the command line wins.")
    p.add_argument("--repository", help="model repository holding the bundle (default: model_repository)")
    p.add_argument("--model", help="model name in the repository (default: dinoserve-demo)")
    p.add_argument("--host", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", help="HTTP port (default: 8080)")
    p.add_argument("--data-dir", help="directory for persistent data (default: data)")
    p.add_argument("--triton-url", help="HOST:PORT of an external Triton's HTTP endpoint; embedded if unset")
    p.add_argument("--vector-store", help="collections: 'embedded' (SQLite + FAISS in the data dir), "
                                          "'qdrant://HOST[:PORT]', 'qdrants://HOST[:PORT]' (TLS) or 'qdrant-local' "
                                          "(default: embedded)")
    p.add_argument("--log-level", help="debug, info, warning, error, critical (default: info)")
    p.add_argument("--log-format",
                   help="json: one JSON object a line with the request id; text: for reading (default: json)")
    p.add_argument("--max-inflight",
                   help="requests that may run the model at once; the next ones get 429 with Retry-After at once, "
                        "never a queue (default: 64)")
    p.add_argument("--inference-timeout-s",
                   help="deadline of one request's inference on Triton in seconds; 504 past it (default: 30)")
    p.add_argument("--demo-collection", help="collection of the demo page at /, filled with labelled samples when "
                                             "absent; '' disables it (default: demo)")
    p.add_argument("--api-keys-file",
                   help="API keys, one entry per line: KEY (read and write), KEY:read or KEY:write; '#' comments. "
                        "DINOSERVE_API_KEYS takes comma-separated entries (not an option: the command line is "
                        "visible to every user of the machine)")
    p.add_argument("--auth",
                   help="auto: keys required when configured; without keys, serve on a loopback address only. "
                        "on: keys always required. off: no keys, even on a public address (default: auto)")


def _add_bench_methods(sub, config) -> None:
    METHODS = config.METHODS
    p = sub.add_parser("bench-methods", help="train every method for the same CPU time; compare k-NN and mask IoU",
                       description="Train DINO, iBOT, MoCo v3, SimCLR, BYOL, SimSiam and SwAV for the same "
                                   "compute budget each on the same data, score each served backbone by "
                                   "weighted k-NN top-1 on a labelled held-out split and by the IoU of its "
                                   "segmentation masks (attention, TokenCut) with the synthetic objects' masks, "
                                   "print one table and "
                                   "write it with the date, machine and command to a Markdown file.")
    p.add_argument("--data", required=True, help="training images: a folder or synthetic:N[:SIZE[:SEED]]")
    p.add_argument("--knn-train", required=True,
                   help="labelled images the k-NN neighbours come from (class sub-folders or synthetic:N...)")
    p.add_argument("--knn-val", required=True, help="labelled held-out images to classify, same classes")
    p.add_argument("--budget-minutes", type=float, required=True,
                   help="training time per method, in CPU minutes of the training process (wall-clock minutes "
                        "with one torch thread on an idle machine; other jobs do not shrink it); each method "
                        "gets the whole epochs nearest the budget, timed from a few steps")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="methods to compare (default: all)")
    p.add_argument("--config", type=Path,
                   help="training options for every method (JSON, TOML or YAML) over the CPU defaults: vit_nano/8 "
                        "on 64 px crops, 2 local crops, batch 32, small heads, data loading in the training "
                        "process (num_workers 0, so that its CPU time counts)")
    p.add_argument("--output", type=Path, default=Path("runs/bench-methods"),
                   help="run directories, one per method, replaced (default: runs/bench-methods)")
    p.add_argument("--doc", type=Path, default=Path("docs/methods.md"),
                   help="Markdown report (default: docs/methods.md)")
    p.add_argument("--eval-size", type=int, help="k-NN crop size (default: the global crop size)")
    p.add_argument("--mask-images", type=int, default=100, help="held-out synthetic images for the mask IoU")
    p.add_argument("--mask-seed", type=int, default=7, help="seed of the mask images (training data: another)")
    p.add_argument("--mask-image-size", type=int, nargs=2, default=[160, 120], metavar=("W", "H"),
                   help="size of the mask images (default: 160 120)")
    p.add_argument("--mask-size", type=int, default=128,
                   help="shorter side of the model input for the masks, as /v1/segment's size (default: 128)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _bench_methods(args) -> int:
    import os
    import shlex

    from training.config import read_options
    from training.method_bench import CPU_DEFAULTS, BenchSetup, bench_methods, report, table

    options = read_options(args.config) if args.config else {}
    setup = BenchSetup(args.data, args.knn_train, args.knn_val, args.budget_minutes,
                       args.eval_size or options.get("global_size", CPU_DEFAULTS["global_size"]),
                       args.mask_images, args.mask_seed, tuple(args.mask_image_size), args.mask_size)
    load_average = os.getloadavg()[0]
    try:
        results, baseline, cfg = bench_methods(setup, tuple(args.methods), options, args.output, not args.quiet)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"dinoserve bench-methods: {error}") from None
    print(table(results, baseline))
    command = shlex.join(["dinoserve", *args.argv])
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(report(results, baseline, setup, cfg, command, load_average))
    print(f"wrote {args.doc}")
    return 0


def _train(args) -> int:
    from training.config import TrainConfig, read_options
    from training.trainer import NonFiniteLossError, backbone_filename, train

    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    try:
        cfg = TrainConfig.build(args.preset, read_options(args.config) if args.config else None, overrides)
    except (ValueError, OSError) as error:
        raise config_error("train", error) from None
    if not cfg.data:
        raise config_error("train", "--data is required (a folder or synthetic:N)")
    try:
        out = train(cfg, progress=not args.quiet)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as error:
        raise SystemExit(f"dinoserve train: {error}") from None
    print(f"wrote {out / 'checkpoint.pth'} and {out / backbone_filename(cfg.method)}")
    return 0


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="draw a run's training curves to a PNG",
                       description="Plot loss, schedules and collapse indicators of a training run from its "
                                   "metrics.csv (and k-NN accuracy from log.jsonl) into one PNG.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="output directory of `dinoserve train`")
    p.add_argument("--output", type=Path, help="PNG path (default: RUN_DIR/curves.png)")


def _plot(args) -> int:
    from training.plot import plot_run

    try:
        path = plot_run(args.run_dir, args.output)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"dinoserve plot: {error}") from None
    print(f"wrote {path}")
    return 0


def _export(args) -> int:
    from training.export import ExportOptions, Serving, export_bundle

    try:
        options = ExportOptions(
            checkpoint_key=args.checkpoint_key, format=args.format, precision=args.precision, version=args.version,
            num_heads=args.num_heads, pos_interpolation=args.pos_interpolation, method=args.method,
            cache_dir=args.cache_dir, verify=args.verify, progress=not args.quiet, crop=args.crop,
            resize=args.resize, segmentation_size=args.segmentation_size,
            serving=Serving(args.max_batch_size, args.queue_delay_us, args.max_queue_size, args.instances))
    except ValueError as error:
        raise config_error("export", error) from None
    try:
        model_dir = export_bundle(args.checkpoint, args.repository, args.name, options)
    except (ValueError, RuntimeError, OSError) as error:
        raise SystemExit(f"dinoserve export: {error}") from None
    print(f"wrote {model_dir}")
    return 0


def _eval_knn(args) -> int:
    from training.evaluate import evaluate_knn

    try:
        report = evaluate_knn(args.model, args.train, args.val, args.k, args.temperature,
                              args.checkpoint_key, args.seed if args.random_init else None,
                              args.batch_size, progress=not args.quiet, size=args.size)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"dinoserve eval-knn: {error}") from None
    print(report.table())
    return 0


def _serve(args) -> int:
    from service.settings import Settings, SettingsError

    try:
        # Every serve option is the Settings field of its name.
        settings = Settings.load({name: getattr(args, name) for name in Settings.model_fields if name in args})
        from service.server import serve  # the web stack, once the settings are known to be good

        return serve(settings)
    except SettingsError as error:
        raise config_error("serve", error) from None


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="dinoserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    config = _trainer_config()
    if config is not None:
        _add_train(sub, config)
        _add_export(sub)
        _add_eval_knn(sub)
    _add_serve(sub)
    if config is not None:
        _add_plot(sub)
        _add_bench_methods(sub, config)
    add_index_parser(sub)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv  # bench-methods records its command line
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGTERM unwinds like Ctrl-C, so `finally` blocks stop Triton and nothing is left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        handlers = {"train": _train, "export": _export, "eval-knn": _eval_knn, "serve": _serve,
                    "plot": _plot, "bench-methods": _bench_methods, "index": run_index}
        return handlers[args.command](args)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
