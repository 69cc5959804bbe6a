"""Real (tiny) DINO and iBOT runs through `dinoserve train`: checkpoints with the official key layout,
an EMA teacher, per-step metrics, exact resume, curves, export of the result."""

import csv
import json
import logging
import math
import shutil

import pytest
import torch
from conftest import run_cli

from training.config import PRESETS, TrainConfig
from training.models import BackboneSpec
from training.methods import teacher_statistics
from training.trainer import cpu_has_bf16_units, resolve_precision


def _metrics(run) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_dino_run_writes_resumable_checkpoint_with_official_key_layout(trained_run):
    state = torch.load(trained_run / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and state["method"] == "dino"
    # main_dino.py's layout: the student is DDP-wrapped there, so its keys carry ``module.``; the teacher's
    # do not (no BatchNorm in the head).
    for network, prefix in (("student", "module."), ("teacher", "")):
        keys = list(state[network])
        assert all(k.startswith(prefix + "backbone.") or k.startswith(prefix + "head.") for k in keys)
        assert prefix + "backbone.blocks.0.attn.qkv.weight" in keys
        assert prefix + "head.last_layer.weight_g" in keys and prefix + "head.last_layer.weight_v" in keys
    assert state["dino_loss"]["center"].shape == (1, 256)
    assert state["dino_loss"]["center"].abs().sum() > 0  # the centre moved from zero
    assert isinstance(state["config"], dict) and state["config"]["arch"] == "vit_nano"
    assert (trained_run / "checkpoint0001.pth").is_file() and (trained_run / "checkpoint0002.pth").is_file()

    history = [json.loads(line) for line in (trained_run / "log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["loss"] > 0 and h["images_per_s"] > 0 for h in history)


def test_teacher_is_an_ema_of_the_student_not_a_copy(trained_run):
    state = torch.load(trained_run / "checkpoint.pth", map_location="cpu", weights_only=True)
    student, teacher = state["student"], state["teacher"]
    key = "backbone.blocks.0.attn.qkv.weight"
    student[key] = student["module." + key]
    assert not torch.equal(student[key], teacher[key])
    # EMA at momentum ≥ 0.996 over a few steps: the teacher stays close to the student.
    assert (student[key] - teacher[key]).abs().max() < 0.05


def test_metrics_log_every_step_with_the_schedules_and_collapse_indicators(trained_run):
    rows = _metrics(trained_run)
    assert [r["step"] for r in rows] == list(range(6))  # 48 images / 16 per step x 2 epochs
    assert [r["epoch"] for r in rows] == [0, 0, 0, 1, 1, 1]
    # Linear-scaling rule: peak lr 0.0005 x 16 / 256, reached after the 1 warm-up epoch, from 0.
    assert rows[0]["lr"] == 0 and rows[3]["lr"] == pytest.approx(0.0005 * 16 / 256)
    assert rows[0]["wd"] == pytest.approx(0.04) and rows[0]["momentum"] == pytest.approx(0.996)
    assert all(r["momentum"] <= rows[-1]["momentum"] for r in rows)
    log_k = math.log(256)
    for r in rows:
        assert 0 <= r["teacher_entropy"] <= log_k + 1e-4 and -1e-6 <= r["teacher_kl_uniform"] <= log_k + 1e-4
        assert r["images_per_s"] > 0 and math.isfinite(r["loss"])


def test_teacher_statistics_detect_both_kinds_of_collapse():
    k = 64
    uniform = torch.zeros(8, k)  # every image: the same flat distribution
    entropy, kl = teacher_statistics(uniform, torch.zeros(1, k), temp=0.04)
    assert entropy == pytest.approx(math.log(k), abs=1e-5) and kl == pytest.approx(0, abs=1e-6)
    one_prototype = torch.zeros(8, k)
    one_prototype[:, 3] = 10  # every image puts all its mass on prototype 3
    entropy, kl = teacher_statistics(one_prototype, torch.zeros(1, k), temp=0.04)
    assert entropy == pytest.approx(0, abs=1e-4) and kl == pytest.approx(math.log(k), abs=1e-4)


@pytest.mark.parametrize("run_fixture, loss_key", [("trained_run", "dino_loss"), ("ibot_run", "ibot_loss"),
                                                   ("curriculum_run", "dino_loss")])
def test_resume_continues_with_the_same_next_step_loss(request, tmp_path, run_fixture, loss_key):
    run = request.getfixturevalue(run_fixture)
    # A run that stopped after its first epoch: its checkpoint of that moment, resumed elsewhere.
    resumed = tmp_path / "resumed"
    run_cli("train", "--config", str(run / "config.json"), "--output", str(resumed),
            "--resume", str(run / "checkpoint0001.pth"), "--saveckp-freq", "0", "--quiet")
    full, again = _metrics(run), _metrics(resumed)
    assert [r["step"] for r in again] == [3, 4, 5]
    for a, b in zip(full[3:], again):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7)
        assert b["lr"] == a["lr"] and b["teacher_temp"] == a["teacher_temp"]
    final = torch.load(resumed / "checkpoint.pth", map_location="cpu", weights_only=True)
    reference = torch.load(run / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert final["epoch"] == 2
    assert torch.allclose(final[loss_key]["center"], reference[loss_key]["center"], atol=1e-6)


def test_ibot_run_masks_patches_and_writes_the_official_ibot_keys(ibot_run):
    state = torch.load(ibot_run / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert state["method"] == "ibot" and state["epoch"] == 2
    student, teacher = state["student"], state["teacher"]
    assert student["module.backbone.masked_embed"].shape == (1, 96)
    assert "backbone.masked_embed" not in teacher  # main_ibot.py's teacher has no mask token
    assert student["module.head.last_layer2.weight_v"].shape == (128, 64)  # patch prototypes of their own
    assert student["module.head.last_layer.weight_v"].shape == (256, 64)
    assert teacher["head.last_layer2.weight_v"].shape == (128, 64)
    assert state["ibot_loss"]["center"].shape == (1, 256) and state["ibot_loss"]["center2"].shape == (1, 1, 128)
    assert state["ibot_loss"]["center2"].abs().sum() > 0

    rows = _metrics(ibot_run)
    assert any(r["masked_ratio"] > 0 for r in rows)
    for r in rows:
        assert r["loss"] == pytest.approx(r["cls_loss"] + r["patch_loss"], rel=1e-5)
        assert (r["patch_loss"] > 0) == (r["masked_ratio"] > 0)

    served = torch.load(ibot_run / "teacher_backbone.pth", map_location="cpu", weights_only=True)
    assert "masked_embed" not in served["state_dict"]  # serving never masks


def test_knn_monitor_reports_dinos_weighted_knn_of_the_teacher_each_epoch(ibot_run):
    from official_reference import knn_top1
    from training.data import open_dataset
    from training.models import BackboneSpec, build_backbone

    history = [json.loads(line) for line in (ibot_run / "log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    train_set, val_set = open_dataset("synthetic:24:64:1"), open_dataset("synthetic:12:64:2")  # the monitor's
    for record, path in zip(history, ("checkpoint0001.pth", "checkpoint.pth")):
        state = torch.load(ibot_run / path, map_location="cpu", weights_only=True)
        teacher = build_backbone(BackboneSpec(**{**state["backbone"], "drop_path_rate": 0.0}))
        teacher.load_state_dict({k.removeprefix("backbone."): v for k, v in state["teacher"].items()
                                 if k.startswith("backbone.")})
        assert record["knn_top1"] == pytest.approx(knn_top1(teacher, train_set, val_set, size=64, k=20))
        assert record["knn_top1"] <= record["knn_top5"]


def test_ibot_run_exports_to_a_bundle_that_matches_pytorch(ibot_run, tmp_path):
    run_cli("export", str(ibot_run / "teacher_backbone.pth"), "--repository", str(tmp_path), "--name", "ibot",
            "--quiet")  # --verify (the default) compares ONNX Runtime with PyTorch
    card = json.loads((tmp_path / "ibot" / "dinoserve.json").read_text())
    assert card["method"] == "ibot" and card["embed_dim"] == 96


def test_plot_draws_the_training_curves(ibot_run, tmp_path):
    from PIL import Image

    run_cli("plot", str(ibot_run), "--output", str(tmp_path / "curves.png"))
    with Image.open(tmp_path / "curves.png") as image:
        assert image.size == (1500, 800)
        assert len(image.convert("L").getcolors(1 << 16)) > 20  # drawn, not blank


def test_presets_carry_the_official_recipes_and_options_override_them(tmp_path):
    cfg = TrainConfig.build("dino_vits16")
    assert (cfg.arch, cfg.patch_size, cfg.out_dim, cfg.teacher_temp, cfg.norm_last_layer) == (
        "vit_small", 16, 65536, 0.07, False)
    assert cfg.lr * cfg.batch_size * 16 / 256 == pytest.approx(0.002)  # 0.0005 x 1024 / 256 on 16 GPUs
    ibot = TrainConfig.build("ibot_vits16")
    assert (ibot.method, ibot.pred_ratio, ibot.pred_ratio_var, ibot.shared_head) == (
        "ibot", (0.0, 0.3), (0.0, 0.2), True)
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 5\nlocal_crops_number: 2\n")
    from training.config import read_options

    cfg = TrainConfig.build("dino_vitb16", read_options(config), {"epochs": 7, "lr": None})
    assert (cfg.arch, cfg.local_crops_number, cfg.epochs, cfg.lr) == ("vit_base", 2, 7, PRESETS["dino_vitb16"]["lr"])
    with pytest.raises(ValueError, match="unknown preset"):
        TrainConfig.build("dino_vitz")
    with pytest.raises(ValueError, match="unknown method"):
        TrainConfig.build(values={"method": "simclr2"})


def test_a_curriculum_trains_on_new_images_and_needs_synthetic_data(curriculum_run, trained_run):
    config = json.loads((curriculum_run / "config.json").read_text())
    assert config["curriculum_epochs"] == 1
    # Same seed, same crops' randomness: only the images differ, so the first step's loss does too.
    assert _metrics(curriculum_run)[0]["loss"] != _metrics(trained_run)[0]["loss"]
    with pytest.raises(ValueError, match="curriculum_epochs draws synthetic images"):
        TrainConfig.from_dict({"data": "some/folder", "curriculum_epochs": 3})
    with pytest.raises(ValueError, match="curriculum_epochs must be 0"):
        TrainConfig.from_dict({"data": "synthetic:64", "curriculum_epochs": -1})


def test_any_plain_timm_vit_name_is_an_architecture():
    spec = BackboneSpec.from_arch("vit_small_patch16_224")
    assert (spec.patch_size, spec.embed_dim, spec.depth, spec.num_heads, spec.img_size) == (16, 384, 12, 6, 224)
    with pytest.raises(ValueError, match="not a plain ViT"):
        BackboneSpec.from_arch("vit_small_patch14_reg4_dinov2")
    with pytest.raises(ValueError, match="unknown arch"):
        BackboneSpec.from_arch("not_a_model")


def test_precision_follows_the_device():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_precision("fp16", torch.device("cpu"))


def test_bf16_units_are_read_from_the_cpu_flags():
    x86 = {"architecture": "x86_64", "avx2": True, "avx512_bf16": False, "amx_bf16": False}
    assert cpu_has_bf16_units(x86) is False
    assert cpu_has_bf16_units({**x86, "avx512_bf16": True}) is True
    assert cpu_has_bf16_units({**x86, "amx_bf16": True}) is True
    assert cpu_has_bf16_units({"architecture": "aarch64"}) is None


def test_bf16_on_a_cpu_without_bf16_units_warns(caplog):
    """On this machine's real CPU: a warning exactly when it has no bf16 units (fp32 never warns)."""
    emulated = cpu_has_bf16_units(torch.cpu.get_capabilities()) is False
    with caplog.at_level(logging.WARNING, logger="training.trainer"):
        resolve_precision("fp32", torch.device("cpu"))
        assert not caplog.records
        resolve_precision("bf16", torch.device("cpu"))
    assert any("without bf16 units" in r.getMessage() for r in caplog.records) == emulated


def test_a_checkpoint_of_another_method_is_not_resumed(trained_run, tmp_path):
    shutil.copy(trained_run / "checkpoint0001.pth", tmp_path / "checkpoint.pth")
    from conftest import BIN, TINY_IBOT
    import subprocess

    result = subprocess.run([str(BIN / "dinoserve"), "train", *TINY_IBOT, "--output", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "is a dino run of vit_nano; this run is ibot" in result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_run_uses_mixed_precision(tmp_path):
    from conftest import TINY_TRAIN

    run_cli("train", *TINY_TRAIN, "--device", "cuda", "--output", str(tmp_path))
    rows = _metrics(tmp_path)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert json.loads((tmp_path / "config.json").read_text())["precision"] == "auto"


def test_bn_in_head_puts_batchnorm_between_the_mlp_layers_for_dino_only():
    from training.trainer import build_models

    cfg = TrainConfig.build(values={"arch": "vit_nano", "img_size": 64, "out_dim": 32, "hidden_dim": 16,
                                    "bottleneck_dim": 8, "use_bn_in_head": True})
    _, student, teacher = build_models(cfg)
    for network in (student, teacher):
        layers = [type(m).__name__ for m in network.head.mlp]
        assert layers == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]
    plain = build_models(TrainConfig.build(values={"arch": "vit_nano", "img_size": 64, "out_dim": 32,
                                                   "hidden_dim": 16, "bottleneck_dim": 8}))[1]
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in plain.modules())
    with pytest.raises(ValueError, match="use_bn_in_head is a DINO option"):
        TrainConfig.build(values={"method": "ibot", "use_bn_in_head": True})


@pytest.mark.parametrize("clip, expected", [
    (3.0, ["scale", "unscale_", "clip", "cancel", "step", "update"]),
    (0.0, ["scale", "cancel", "step", "update"]),  # unscaled only when clipping needs true gradients
])
def test_fp16_grad_scaler_calls_follow_the_official_order(tmp_path, monkeypatch, clip, expected):
    import training.trainer as trainer_module
    from training.trainer import Trainer

    calls = []

    class RecordingScaler(torch.amp.GradScaler):  # the real scaler, the trainer's calls recorded
        stepping = False  # GradScaler.step unscales by itself when the trainer has not

        def scale(self, outputs):
            calls.append("scale")
            return super().scale(outputs)

        def unscale_(self, optimizer):
            if not self.stepping:
                calls.append("unscale_")
            return super().unscale_(optimizer)

        def step(self, optimizer, *args, **kwargs):
            calls.append("step")
            self.stepping = True
            try:
                return super().step(optimizer, *args, **kwargs)
            finally:
                self.stepping = False

        def update(self, new_scale=None):
            calls.append("update")
            return super().update(new_scale)

    clip_gradients = trainer_module.clip_gradients
    monkeypatch.setattr(trainer_module, "clip_gradients", lambda *a: (calls.append("clip"), clip_gradients(*a)))
    cfg = TrainConfig.build(values={"arch": "vit_pico", "patch_size": 8, "img_size": 32, "global_size": 32,
                                    "local_size": 16, "local_crops_number": 1, "out_dim": 16, "hidden_dim": 16,
                                    "bottleneck_dim": 8, "batch_size": 2, "data": "synthetic:2:32:0",
                                    "num_workers": 0, "tensorboard": False, "clip_grad": clip, "device": "cpu",
                                    "output": str(tmp_path)})
    trainer = Trainer(cfg, progress=False)
    trainer.scaler = RecordingScaler("cpu")
    on_gradients = trainer.objective.on_gradients
    monkeypatch.setattr(trainer.objective, "on_gradients", lambda *a: (calls.append("cancel"), on_gradients(*a)))
    crops, masks = next(iter(trainer.loader))
    trainer.step(crops, masks, epoch=0, it=0)
    assert calls == expected
