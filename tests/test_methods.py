"""MoCo v3, SimCLR, BYOL, SimSiam and SwAV as objectives of the DINO trainer: the references' networks,
their options, exact resume, and per method family (contrastive, momentum distillation, clustering) tiny
runs of `dinoserve train` exported by `dinoserve export` and served by `dinoserve serve` as DINO's are.

The command line runs in this process (``dinoserve.cli.main``, the `dinoserve` entry point) so that
torch is imported once: all of it takes about a minute and a half on two cores, most of it exporting
and serving."""

from __future__ import annotations

import csv
import io
import json
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from official_reference import knn_top1
from serving import Server
from torchvision import transforms as T

from dinoserve.cli import main as dinoserve_main
from training.config import TrainConfig
from training.data import make_sample, open_dataset
from training.export import load_backbone
from training.methods import OBJECTIVES, SwAVHead
from training.models import BackboneSpec, build_backbone
from training.trainer import Trainer, train

FAMILIES = {"contrastive": ("mocov3", "simclr"), "momentum distillation": ("byol", "simsiam"),
            "clustering": ("swav",)}
METHODS = [m for members in FAMILIES.values() for m in members]
TINY = ["--data", "synthetic:24:64:0", "--arch", "vit_nano", "--epochs", "2", "--batch-size", "8",
        "--global-size", "32", "--local-size", "16", "--local-crops-number", "2", "--hidden-dim", "64",
        "--bottleneck-dim", "32", "--warmup-epochs", "1", "--num-workers", "0", "--no-tensorboard",
        "--saveckp-freq", "1", "--quiet"]
OPTIONS = {"mocov3": ["--queue-size", "64", "--freeze-patch-embed"],
           "swav": ["--swav-prototypes", "16", "--freeze-prototypes-iters", "2"]}
STEPS_PER_EPOCH = 3  # 24 images / 8


def dinoserve(*args: str) -> None:
    """`dinoserve ARGS` in this process (the entry point sets a SIGTERM handler; pytest's is put back)."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert dinoserve_main([str(a) for a in args]) == 0
    finally:
        signal.signal(signal.SIGTERM, handler)


def metrics(run) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def checkpoint(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def tiny_config(method: str, **values) -> TrainConfig:
    base = dict(arch="vit_nano", global_size=32, local_size=16, local_crops_number=2, hidden_dim=64,
                bottleneck_dim=32, swav_prototypes=16, method=method)
    return TrainConfig.build(values={**base, **values})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs[method]``: the output directory of a 2-epoch `dinoserve train --method METHOD` (made once)."""
    class Runs(dict):
        def __missing__(self, method):
            out = self[method] = tmp_path_factory.mktemp(method)
            dinoserve("train", *TINY, "--method", method, *OPTIONS.get(method, []), "--output", out)
            return out

    return Runs()


# -- the networks --------------------------------------------------------------------------------


def layers(module) -> list[str]:
    return [type(m).__name__ + ("(affine=False)" if getattr(m, "affine", True) is False else "") for m in module]


@pytest.mark.parametrize("method, projector, predictor, momentum_encoder", [
    # moco-v3 builder.py: 3-layer projector and 2-layer predictor, both ending in a BN without affine
    ("mocov3", ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d(affine=False)"],
     ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d(affine=False)"], True),
    ("simclr", ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d(affine=False)"], None, False),
    ("byol", ["Linear", "BatchNorm1d", "ReLU", "Linear"], ["Linear", "BatchNorm1d", "ReLU", "Linear"], True),
    ("simsiam", ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d(affine=False)"],
     ["Linear", "BatchNorm1d", "ReLU", "Linear"], False),
])
def test_each_method_builds_its_references_mlps(method, projector, predictor, momentum_encoder):
    objective = OBJECTIVES[method](tiny_config(method))
    student, teacher = objective.build_networks(BackboneSpec.from_arch("vit_nano"))
    assert layers(student.head.projector) == projector
    assert (layers(student.head.predictor) if student.head.predictor is not None else None) == predictor
    assert [m for m in student.head.projector if isinstance(m, torch.nn.Linear)][-1].out_features == 32
    if method == "simsiam":  # the bottleneck predictor: a quarter of the projection width
        assert student.head.predictor[0].out_features == 8
    assert (teacher is not None) == momentum_encoder
    if teacher is not None:
        assert teacher.head.predictor is None  # the momentum encoder has no predictor
        weights = student.state_dict()
        assert all(torch.equal(v, weights[k]) for k, v in teacher.state_dict().items())
        assert not any(p.requires_grad for p in teacher.parameters())


def test_swav_head_projects_onto_the_sphere_and_scores_against_prototypes():
    objective = OBJECTIVES["swav"](tiny_config("swav"))
    student, teacher = objective.build_networks(BackboneSpec.from_arch("vit_nano"))
    assert teacher is None and isinstance(student.head, SwAVHead)
    assert layers(student.head.projector) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert student.head.prototypes.weight.shape == (16, 32) and student.head.prototypes.bias is None
    z, scores = student.head(torch.randn(4, 96))
    assert torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-6)
    assert torch.allclose(scores, z @ student.head.prototypes.weight.T)


def test_without_mlp_bn_no_batchnorm_is_left_and_the_linear_layers_keep_their_biases():
    for method in ("mocov3", "simclr", "byol", "simsiam", "swav"):
        student, _ = OBJECTIVES[method](tiny_config(method, mlp_bn=False)).build_networks(
            BackboneSpec.from_arch("vit_nano"))
        assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in student.modules())
        assert all(m.bias is not None for m in student.head.modules() if type(m) is torch.nn.Linear
                   and m is not getattr(student.head, "prototypes", None))
    with pytest.raises(ValueError, match="DINO's head has use_bn_in_head"):
        TrainConfig.build(values={"method": "dino", "mlp_bn": False})
    with pytest.raises(ValueError, match="MoCo v3 option"):
        TrainConfig.build(values={"method": "byol", "queue_size": 16})


def test_swav_renormalises_prototypes_and_freezes_them_for_the_first_iterations():
    objective = OBJECTIVES["swav"](tiny_config("swav", freeze_prototypes_iters=2))
    student, _ = objective.build_networks(BackboneSpec.from_arch("vit_nano", drop_path_rate=0.0))
    with torch.no_grad():
        student.head.prototypes.weight.mul_(3.0)
    crops = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)]
    for step, frozen in ((1, True), (2, False)):
        student.zero_grad()
        loss, stats = objective(student, None, crops, torch.empty(4, 0, dtype=torch.bool), 0)
        norms = student.head.prototypes.weight.norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)  # back on the sphere before the step
        loss.backward()
        objective.on_gradients(student, 0, step)
        assert (student.head.prototypes.weight.grad is None) == frozen
        assert student.backbone.blocks[0].attn.qkv.weight.grad is not None
        assert 0 < stats["embedding_std"] <= 1


def test_simclr_normalises_both_views_as_one_batch_of_2n():
    """google-research/simclr runs the 2N augmented images through the network together, so BatchNorm's
    statistics are those of all 2N: after one step from zero, the running mean is 0.1 x their mean."""
    objective = OBJECTIVES["simclr"](tiny_config("simclr"))
    student, _ = objective.build_networks(BackboneSpec.from_arch("vit_nano", drop_path_rate=0.0))
    student.train()
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    objective(student, None, views, torch.empty(4, 0, dtype=torch.bool), 0)
    linear, bn = student.head.projector[0], student.head.projector[1]
    with torch.no_grad():
        hidden = linear(student.backbone(torch.cat(views)))
    torch.testing.assert_close(bn.running_mean, 0.1 * hidden.mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, ncrops", [("mocov3", 2), ("simclr", 2), ("byol", 2), ("swav", 4)])
def test_two_view_methods_take_the_global_crops_and_swav_the_local_crops_too(tmp_path, method, ncrops):
    trainer = Trainer(tiny_config(method, data="synthetic:8:64:0", batch_size=4, num_workers=0, tensorboard=False,
                                  output=str(tmp_path)), progress=False)
    crops, _ = next(iter(trainer.loader))
    assert [tuple(c.shape) for c in crops] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * (ncrops - 2)


# -- runs: options, checkpoints, resume ----------------------------------------------------------


def test_moco_queue_enqueues_every_step_and_travels_in_the_checkpoint(runs):
    first = checkpoint(runs["mocov3"] / "checkpoint0001.pth")["mocov3_loss"]
    last = checkpoint(runs["mocov3"] / "checkpoint.pth")["mocov3_loss"]
    # 3 steps x 2 views x 8 keys = 48 enqueued after epoch 1; 96 after 2, wrapping the 64 slots.
    assert int(first["loss.queue.filled"]) == 48 and int(first["loss.queue.pointer"]) == 48
    assert int(last["loss.queue.filled"]) == 64 and int(last["loss.queue.pointer"]) == 32
    norms = first["loss.queue.keys"][:48].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)  # normalised keys
    assert first["loss.queue.keys"][48:].abs().sum() == 0
    rows = metrics(runs["mocov3"])
    assert [r["step"] for r in rows] == list(range(6)) and all(0 < r["momentum"] < 1 for r in rows)


def test_frozen_patch_projection_stays_at_its_random_initialisation(runs):
    first = checkpoint(runs["mocov3"] / "checkpoint0001.pth")
    last = checkpoint(runs["mocov3"] / "checkpoint.pth")
    for key in ("backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias"):
        assert torch.equal(first["student"]["module." + key], last["student"]["module." + key])
        # EMA of equal values (the momentum encoder has BatchNorm: DDP-wrapped, its keys carry module. too)
        assert torch.allclose(last["student"]["module." + key], last["teacher"]["module." + key], atol=1e-7)
    assert last["student"]["module.backbone.patch_embed.proj.bias"].abs().sum() == 0
    key = "module.backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(first["student"][key], last["student"][key])  # the rest trains


@pytest.mark.parametrize("method", METHODS)
def test_resume_continues_with_the_same_next_step_loss(runs, tmp_path, method):
    run = runs[method]
    resumed = tmp_path / "resumed"
    dinoserve("train", "--config", run / "config.json", "--output", resumed,
              "--resume", run / "checkpoint0001.pth", "--saveckp-freq", "0", "--quiet")
    full, again = metrics(run), metrics(resumed)
    assert [r["step"] for r in again] == list(range(STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH))
    for a, b in zip(full[STEPS_PER_EPOCH:], again):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7)
        assert b["embedding_std"] == pytest.approx(a["embedding_std"], rel=1e-5)
        assert b["lr"] == a["lr"]
    final, reference = checkpoint(resumed / "checkpoint.pth"), checkpoint(run / "checkpoint.pth")
    networks = ("student", "teacher") if "teacher" in reference else ("student",)
    assert ("teacher" in reference) == (method in ("mocov3", "byol"))
    for network in networks:
        for key, value in reference[network].items():
            assert torch.allclose(final[network][key], value, atol=1e-6), f"{network} {key}"
    for key, value in reference[f"{method}_loss"].items():  # MoCo's queue
        assert torch.allclose(final[f"{method}_loss"][key].float(), value.float(), atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_the_served_backbone_is_the_trained_network(runs, method):
    state = checkpoint(runs[method] / "checkpoint.pth")
    assert state["method"] == method and state["epoch"] == 2 and state["config"]["method"] == method
    assert any(k.startswith("module.head.projector.") for k in state["student"])  # the method's own modules
    spec, card_method, served = load_backbone(runs[method] / "backbone.pth")
    _, _, student = load_backbone(runs[method] / "checkpoint.pth", "student")
    assert card_method == method and served.keys() == student.keys()
    assert all(torch.equal(served[k], student[k]) for k in served)
    build_backbone(spec).load_state_dict(served)  # the very ViT the DINO path exports


def test_plot_draws_the_curves_of_a_method_without_momentum_encoder(runs, tmp_path):
    from training.plot import plot_run

    with Image.open(plot_run(runs["simsiam"], tmp_path / "curves.png")) as image:
        assert image.size == (1500, 800)
        assert len(image.convert("L").getcolors(1 << 16)) > 20  # drawn, not blank



@pytest.mark.slow
def test_two_process_moco_run_enqueues_every_ranks_keys_and_keeps_the_momentum_encoders_equal(tmp_path):
    out = tmp_path / "ddp"
    bin_dir = Path(sys.executable).parent
    result = subprocess.run(
        [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2", str(bin_dir / "dinoserve"), "train",
         *TINY, "--method", "mocov3", "--queue-size", "256", "--data", "synthetic:32:64:0", "--output", str(out)],
        capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": str(bin_dir)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    state = checkpoint(out / "checkpoint.pth")
    assert state["world_size"] == 2 and state["epoch"] == 2
    fingerprints = state["teacher_fingerprints"]  # each rank's momentum encoder after its own EMA steps
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    # 32 images, 8 per process x 2 processes: 2 steps per epoch; each step enqueues 2 views x 16 keys.
    assert [r["step"] for r in metrics(out)] == [0, 1, 2, 3]
    assert int(state["mocov3_loss"]["loss.queue.filled"]) == 4 * 2 * 16

# -- BYOL without BatchNorm ----------------------------------------------------------------------


def test_byol_without_batchnorm_in_its_mlps_loses_the_spread_of_its_embeddings(tmp_path):
    """BYOL has no negatives: nothing in its loss stops every image from getting the same embedding.
    Fetterman & Albrecht (2020, "Understanding self-supervised and contrastive learning with BYOL") found
    that without BatchNorm in the projector and predictor BYOL collapses to chance-level features, and
    Richemond et al. (2020, "BYOL works even without batch statistics") confirmed that removing BN
    collapses it unless another normalisation and a careful initialisation take its place.

    A full collapse takes far longer than a test may run on two CPU cores, so this asserts what a dozen
    steps show, measured by SimSiam's indicator (the standard deviation of the L2-normalised projections
    over the batch, ``1/sqrt(dim)`` ≈ 0.18 here when spread, 0 when collapsed):

    - the mechanism: with BN each hidden unit is standardised over the batch, so the projections of a
      batch are spread from the first step whatever the backbone gives; without BN they start narrower;
    - the trend: without BN the spread shrinks, faster than with BN, while the loss falls lower (online and
      target outputs agree by converging).

    Every assertion compares the two runs, or a run's end with its start: no threshold is a number read
    off an earlier run.
    """
    spread, loss = {}, {}
    for bn in (True, False):
        out = train(tiny_config("byol", data="synthetic:32:64:0", batch_size=16, epochs=6, warmup_epochs=0,
                                lr=0.005, drop_path_rate=0.0, hidden_dim=128, mlp_bn=bn, num_workers=0,
                                tensorboard=False, output=str(tmp_path / f"bn-{bn}")), progress=False)
        spread[bn] = [r["embedding_std"] for r in metrics(out)]
        loss[bn] = statistics.mean(r["loss"] for r in metrics(out)[-3:])
    with_bn, without_bn = spread[True], spread[False]
    assert len(with_bn) == len(without_bn) == 12
    assert loss[False] < loss[True]
    assert without_bn[0] < with_bn[0]
    kept = {bn: statistics.mean(spread[bn][-3:]) / statistics.mean(spread[bn][:3]) for bn in spread}
    assert kept[False] < 1 and kept[False] < kept[True]
    assert statistics.mean(without_bn[-3:]) < statistics.mean(with_bn[-3:])


# -- end to end: export and serve ----------------------------------------------------------------

DINO_EVAL = T.Compose([
    T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
    T.CenterCrop(224),
    T.ToTensor(),
    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
])


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    make_sample(seed, size=(320, 240)).image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_trains_exports_and_serves_like_dino(runs, tmp_path, family):
    """Every member is exported by `dinoserve export`; the first is served by `dinoserve serve` and must
    answer with its backbone's embeddings, the others are checked by export's ONNX Runtime-against-PyTorch
    verification."""
    repository = tmp_path / "repository"
    served = FAMILIES[family][0]
    for method in FAMILIES[family]:
        verify = "--no-verify" if method == served else "--verify"
        dinoserve("export", runs[method] / "backbone.pth", "--repository", repository, "--name", method,
                  verify, "--quiet")
    spec, _, weights = load_backbone(runs[served] / "backbone.pth")
    vit = build_backbone(spec)
    vit.load_state_dict(weights)
    images = [jpeg(1), jpeg(2)]
    with torch.no_grad():
        expected = vit.eval()(torch.stack([DINO_EVAL(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]))

    server = Server(repository / served, tmp_path / "serve.log")
    try:
        server.wait_ready()
        model = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]
        assert (model["name"], model["method"], model["embed_dim"]) == (served, served, 96)
        files = [("images", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
        response = httpx.post(f"{server.url}/v1/embeddings", files=files, timeout=60)
        assert response.status_code == 200, response.text
        embeddings = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
        assert np.abs(embeddings - expected.numpy()).max() <= 1e-4
        segment = httpx.post(f"{server.url}/v1/segment", files={"image": ("0.jpg", images[0], "image/jpeg")},
                             data={"outputs": "grid"}, timeout=60)
        assert segment.status_code == 200 and segment.json()["heads"] == 2
    finally:
        server.stop()



# -- the comparison ------------------------------------------------------------------------------

@pytest.mark.slow
def test_bench_methods_trains_each_method_to_the_budget_and_writes_one_table(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"patch_size": 16, "global_size": 32, "local_size": 16, "batch_size": 8,
                                  "hidden_dim": 64, "bottleneck_dim": 32, "swav_prototypes": 16, "num_workers": 0}))
    doc, runs_dir = tmp_path / "methods.md", tmp_path / "runs"
    dinoserve("bench-methods", "--data", "synthetic:32:64:0", "--knn-train", "synthetic:24:64:1",
              "--knn-val", "synthetic:12:64:2", "--budget-minutes", "0.02", "--methods", "simclr", "swav",
              "--config", config, "--output", runs_dir, "--doc", doc, "--mask-images", "3", "--mask-size", "64",
              "--quiet")
    text = doc.read_text()
    assert "`dinoserve bench-methods --data synthetic:32:64:0 --knn-train synthetic:24:64:1" in text
    assert "6 classes, chance 16.7 %" in text and "vit_nano/16 ViT on 32 px global crops" in text
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.split("|")[1:-1]]
                                          for line in text.splitlines() if line.startswith("| "))}
    assert list(rows) == ["method", "simclr", "swav", "random init"]
    train_set, val_set = open_dataset("synthetic:24:64:1"), open_dataset("synthetic:12:64:2")
    for method in ("simclr", "swav"):
        run = json.loads((runs_dir / method / "config.json").read_text())
        assert run["epochs"] >= 1
        assert (rows[method][1], rows[method][2]) == (str(run["epochs"]), str(run["epochs"] * 4))  # 32 images / 8
        spec, _, weights = load_backbone(runs_dir / method / "backbone.pth")
        vit = build_backbone(spec)
        vit.load_state_dict(weights)
        assert float(rows[method][5]) == pytest.approx(knn_top1(vit, train_set, val_set, size=32), abs=0.05)
    with torch.random.fork_rng(devices=[]):  # the baseline: the runs' architecture drawn from their seed
        torch.manual_seed(run["seed"])
        random_init = build_backbone(BackboneSpec.from_arch(run["arch"], run["patch_size"], run["img_size"]))
    assert float(rows["random init"][5]) == pytest.approx(knn_top1(random_init, train_set, val_set, size=32), abs=0.05)
