"""Files that cannot be exported are refused before anything is written: a pickle naming a foreign global
(never unpickled), a truncated file, another architecture's state dict, a width without a standard head
count, TensorRT without a GPU. Each is one line (``SystemExit(message)``: printed to stderr, exit status
1) and nothing else on the console."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from official_reference import make_official_vit
from torchvision.models import resnet18

from dinoserve.cli import main
from training.export import tensorrt_unavailable
from training.weights import CheckpointError, load_checkpoint


class RunsAShellCommand:
    """Unpickling this calls ``os.system``: what a malicious checkpoint does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(autouse=True)
def keep_sigterm_handler():
    """``main`` installs the CLI's SIGTERM handler; give pytest its own back."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def export_fails(checkpoint: Path, repository: Path, *options: str, capfd=None) -> str:
    """Run ``dinoserve export`` in-process; return its error message (it must exit non-zero)."""
    with pytest.raises(SystemExit) as exited:
        main(["export", str(checkpoint), "--repository", str(repository), "--name", "refused", *options])
    message = exited.value.code
    assert isinstance(message, str) and message.startswith("dinoserve export: ")  # exit status 1
    assert "\n" not in message
    if capfd is not None:
        assert capfd.readouterr() == ("", ""), "the message must be the only output"
    assert not repository.exists(), "nothing may be written to the repository"
    return message


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("release") / "dino_release.pth"
    torch.save(make_official_vit(seed=0).state_dict(), path)
    return path


def test_a_pickle_with_a_foreign_global_is_refused_without_running_it(release, tmp_path, capfd):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.pth"
    torch.save({"state_dict": torch.load(release, weights_only=True), "hook": RunsAShellCommand(f"touch {marker}")},
               hostile)
    capfd.readouterr()
    message = export_fails(hostile, tmp_path / "repository", capfd=capfd)
    assert "refused" in message and "posix.system" in message and "arbitrary code" in message
    assert not marker.exists(), "the payload ran"


def test_a_truncated_checkpoint_is_refused(release, tmp_path, capfd):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(release.read_bytes()[: release.stat().st_size // 2])
    message = export_fails(truncated, tmp_path / "repository", capfd=capfd)
    assert "not a readable checkpoint" in message and "truncated" in message


def test_another_architectures_state_dict_is_refused_naming_the_keys(tmp_path, capfd):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), path)
    capfd.readouterr()
    message = export_fails(path, tmp_path / "repository", capfd=capfd)
    assert "does not hold a ViT backbone" in message
    assert "missing patch_embed.proj.weight, pos_embed, blocks.0.attn.qkv.weight, norm.weight" in message
    assert "unexpected bn1.bias" in message


def test_weights_that_do_not_fit_the_inferred_vit_name_the_odd_keys(release, tmp_path):
    state = torch.load(release, weights_only=True)
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.0.attn.q_bias"] = torch.zeros(192)
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    message = export_fails(path, tmp_path / "repository")
    assert "missing blocks.1.mlp.fc2.bias" in message and "unexpected blocks.0.attn.q_bias" in message


def test_a_width_without_a_standard_head_count_needs_num_heads(tmp_path):
    path = tmp_path / "narrow.pth"
    torch.save(make_official_vit(seed=0, dim=96, num_heads=2).state_dict(), path)
    message = export_fails(path, tmp_path / "repository")
    assert "width 96" in message and "--num-heads" in message
    assert load_checkpoint(path, num_heads=2).spec.num_heads == 2


def test_a_missing_network_is_named(tmp_path):
    path = tmp_path / "teacher_only.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in make_official_vit(seed=0).state_dict().items()}}, path)
    with pytest.raises(CheckpointError, match="has no 'student' weights"):
        load_checkpoint(path, "student")


@pytest.mark.skipif(tensorrt_unavailable() is None, reason="TensorRT and a GPU are present")
def test_tensorrt_without_a_gpu_fails_cleanly(release, tmp_path):
    message = export_fails(release, tmp_path / "repository", "--format", "tensorrt")
    assert "needs TensorRT and an NVIDIA GPU" in message and tensorrt_unavailable() in message
