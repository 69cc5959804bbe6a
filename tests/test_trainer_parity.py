"""``Trainer.step`` is the official training step: DINO and iBOT from the same weights and crops as a run
of the official ``train_one_epoch`` (main_dino.py / main_ibot.py), six steps over two epochs.

The fixtures (``tests/fixtures/trainer_parity_{dino,ibot}.pt``) were written by the official code itself,
run on a CPU as ``tests/fixtures/README.md`` describes; they hold the initial student, each step's crops,
masks and torch seed (stochastic depth draws), the official per-step losses and the final student,
teacher and loss centres. Tolerance: 2e-5 (max abs), fp32 rounding of a different operation order.
"""

from pathlib import Path

import pytest
import torch

from training.config import TrainConfig
from training.models import BackboneSpec, build_backbone
from training.trainer import Trainer

FIXTURES = Path(__file__).parent / "fixtures"
TOLERANCE = 2e-5


def trainer_for(fixture: dict, tmp_path: Path) -> Trainer:
    c = fixture["config"]
    values = dict(
        method=fixture["method"], arch="vit_pico", patch_size=c["patch_size"], img_size=c["img_size"],
        global_size=c["global_size"], local_size=c["local_size"], local_crops_number=c["local_crops_number"],
        batch_size=c["batch_size"], data=f"synthetic:{c['batch_size'] * c['iters']}:{c['global_size']}:0",
        epochs=c["epochs"], lr=c["lr"], min_lr=c["min_lr"], warmup_epochs=c["warmup_epochs"],
        weight_decay=c["weight_decay"], weight_decay_end=c["weight_decay_end"],
        momentum_teacher=c["momentum_teacher"], clip_grad=c["clip_grad"], freeze_last_layer=c["freeze_last_layer"],
        norm_last_layer=c["norm_last_layer"], drop_path_rate=c["drop_path_rate"], out_dim=c["out_dim"],
        hidden_dim=c["hidden_dim"], bottleneck_dim=c["bottleneck_dim"], warmup_teacher_temp=c["warmup_teacher_temp"],
        teacher_temp=c["teacher_temp"], warmup_teacher_temp_epochs=c["warmup_teacher_temp_epochs"],
        student_temp=c["student_temp"], center_momentum=c["center_momentum"], num_workers=0, tensorboard=False,
        precision="fp32", device="cpu", output=str(tmp_path))
    if fixture["method"] == "ibot":
        values.update(patch_out_dim=c["patch_out_dim"], shared_head=c["shared_head"],
                      shared_head_teacher=c["shared_head_teacher"], pred_start_epoch=c["pred_start_epoch"],
                      warmup_teacher_patch_temp=c["warmup_teacher_patch_temp"],
                      teacher_patch_temp=c["teacher_patch_temp"], lambda1=c["lambda1"], lambda2=c["lambda2"])
    trainer = Trainer(TrainConfig.build(values=values), progress=False)
    assert trainer.iters == c["iters"]
    return trainer


def determined(name: str, value: torch.Tensor) -> torch.Tensor:
    """The part of a parameter the training step determines. The key third of ``attn.qkv.bias`` adds the
    same score to every key of a query, which softmax cancels: its exact gradient is zero, so what the
    backward pass leaves there is rounding noise, and AdamW scales that noise up to a step of about lr.
    Two CPUs (or two operation orders) then move it differently, by up to the learning rate; nothing
    downstream depends on it."""
    value = value.float()
    if name.endswith("attn.qkv.bias"):
        query, _, val = value.chunk(3)
        return torch.cat([query, val])
    return value


def max_diff(ours: dict, theirs: dict) -> float:
    assert set(ours) == set(theirs)
    return max(float((determined(k, ours[k]) - determined(k, theirs[k])).abs().max()) for k in theirs)


@pytest.mark.parametrize("method", ["dino", "ibot"])
def test_six_official_steps_across_an_epoch_boundary_give_the_official_run(method, tmp_path):
    fixture = torch.load(FIXTURES / f"trainer_parity_{method}.pt", weights_only=True)
    trainer = trainer_for(fixture, tmp_path)
    initial = {k: v.float() for k, v in fixture["initial_student"].items()}
    loss_state = {k: torch.zeros_like(v) for k, v in fixture["loss_state"].items()}
    # The official start: teacher loaded from the student (iBOT: non-strict, as main_ibot.py).
    teacher = {k: initial[k] for k in fixture["teacher"]}
    trainer.load_official_checkpoint({"student": {f"module.{k}": v for k, v in initial.items()},
                                      "teacher": teacher, f"{method}_loss": loss_state})
    iters = fixture["config"]["iters"]
    for s, (codes, seed) in enumerate(zip(fixture["crops"], fixture["step_seeds"])):
        crops = [(u.float() - 128.0) / 64.0 for u in codes]
        masks = fixture["masks"][s] if method == "ibot" else torch.empty(len(codes[0]), 0, dtype=torch.bool)
        torch.manual_seed(seed)
        row = trainer.step(crops, masks, epoch=s // iters, it=s % iters)
        assert row["loss"] == pytest.approx(fixture["loss"][s], abs=TOLERANCE), f"step {s}"
        assert row["lr"] == pytest.approx(fixture["lr"][s], rel=1e-12)
        assert row["wd"] == pytest.approx(fixture["wd"][s], rel=1e-12)
        assert row["momentum"] == pytest.approx(fixture["momentum"][s], rel=1e-12)
    ckpt = trainer.official_checkpoint()
    assert all(k.startswith("module.") for k in ckpt["student"])
    student = {k.removeprefix("module."): v for k, v in ckpt["student"].items()}
    assert max_diff(student, fixture["student"]) <= TOLERANCE
    assert max_diff(ckpt["teacher"], fixture["teacher"]) <= TOLERANCE
    assert max_diff(ckpt[f"{method}_loss"], fixture["loss_state"]) <= TOLERANCE
    # The official run moved the weights far more than the tolerance: the comparison has teeth.
    assert max_diff(student, {k: initial[k] for k in fixture["student"]}) > 100 * TOLERANCE


def test_the_key_bias_left_out_of_the_comparison_gets_no_gradient_but_rounding():
    """Why ``determined`` drops the key third of ``qkv.bias``: its gradient is zero up to fp32 rounding,
    while the query and value biases get real gradients."""
    torch.manual_seed(0)
    backbone = build_backbone(BackboneSpec.from_arch("vit_pico", 8, 32))
    backbone(torch.randn(4, 3, 32, 32)).square().sum().backward()
    for block in backbone.blocks:
        query, key, value = block.attn.qkv.bias.grad.chunk(3)
        assert float(key.abs().max()) < 1e-5 * float(query.abs().max())
        assert float(value.abs().max()) > 1e-3 * float(query.abs().max())
