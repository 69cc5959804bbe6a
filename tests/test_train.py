"""A real (tiny) DINO run: checkpoints with the official key layout, an EMA teacher, a log, resume."""

import json

import torch

from training.config import TrainConfig
from training.trainer import train


def test_training_writes_resumable_checkpoint_with_official_key_layout(trained_run):
    state = torch.load(trained_run / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and state["method"] == "dino"
    for network in ("student", "teacher"):
        keys = state[network].keys()
        assert any(k.startswith("backbone.blocks.") for k in keys)
        assert "head.last_layer.weight_g" in keys and "head.last_layer.weight_v" in keys
    assert state["dino_loss"]["center"].shape == (1, 256)
    assert state["dino_loss"]["center"].abs().sum() > 0  # the centre moved from zero

    history = [json.loads(line) for line in (trained_run / "log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["loss"] > 0 and h["images_per_s"] > 0 for h in history)


def test_teacher_is_an_ema_of_the_student_not_a_copy(trained_run):
    state = torch.load(trained_run / "checkpoint.pth", map_location="cpu", weights_only=True)
    student, teacher = state["student"], state["teacher"]
    key = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(student[key], teacher[key])
    # EMA at momentum ≥ 0.996 over a few steps: the teacher stays close to the student.
    assert (student[key] - teacher[key]).abs().max() < 0.05


def test_training_resumes_from_its_checkpoint(trained_run, tmp_path):
    cfg = TrainConfig.from_dict(json.loads((trained_run / "config.json").read_text()))
    run = tmp_path / "resumed"
    run.mkdir()
    (run / "checkpoint.pth").write_bytes((trained_run / "checkpoint.pth").read_bytes())
    cfg.output, cfg.epochs = str(run), 3
    train(cfg, progress=False)
    state = torch.load(run / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert state["epoch"] == 3
    assert [json.loads(x)["epoch"] for x in (run / "log.jsonl").read_text().splitlines()] == [3]
