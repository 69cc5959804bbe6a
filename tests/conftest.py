"""Shared fixtures: one tiny DINO run, its exported bundle and a server of it, made once per test session
through the real command line (``dinoserve train``, ``dinoserve export``, ``dinoserve serve``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from serving import Server

BIN = Path(sys.executable).parent
TINY_TRAIN = [
    "--data", "synthetic:48:64:0", "--arch", "vit_nano", "--epochs", "2", "--batch-size", "16",
    "--global-size", "64", "--local-size", "32", "--local-crops-number", "2", "--out-dim", "256",
    "--hidden-dim", "128", "--bottleneck-dim", "64", "--warmup-epochs", "1", "--num-workers", "0",
    "--warmup-teacher-temp-epochs", "1", "--quiet", "--saveckp-freq", "1",
]
# The same with iBOT: masked patch tokens with their own (smaller) prototypes, for student and teacher.
TINY_IBOT = [*TINY_TRAIN, "--method", "ibot", "--patch-out-dim", "128", "--no-shared-head-teacher",
             "--pred-ratio", "0", "0.3", "--pred-ratio-var", "0", "0.2"]


def run_cli(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "dinoserve"), *args], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, f"dinoserve {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A run directory of ``dinoserve train`` (2 epochs of a 2-block ViT on 48 synthetic images)."""
    out = tmp_path_factory.mktemp("run")
    run_cli("train", *TINY_TRAIN, "--output", str(out))
    return out


@pytest.fixture(scope="session")
def ibot_run(tmp_path_factory) -> Path:
    """A run directory of ``dinoserve train --method ibot`` (same size as ``trained_run``), with a k-NN
    monitor after each epoch."""
    out = tmp_path_factory.mktemp("ibot")
    run_cli("train", *TINY_IBOT, "--output", str(out), "--knn-every", "1", "--knn-train", "synthetic:24:64:1",
            "--knn-val", "synthetic:12:64:2")
    return out


@pytest.fixture(scope="session")
def curriculum_run(tmp_path_factory) -> Path:
    """``trained_run`` on a curriculum (``--curriculum-epochs 1``): plain shapes in epoch 1, any in epoch 2."""
    out = tmp_path_factory.mktemp("curriculum")
    run_cli("train", *TINY_TRAIN, "--curriculum-epochs", "1", "--output", str(out))
    return out


@pytest.fixture(scope="session")
def bundle(trained_run, tmp_path_factory) -> Path:
    """A model directory written by ``dinoserve export`` from the tiny run's full checkpoint."""
    repository = tmp_path_factory.mktemp("repository")
    run_cli("export", str(trained_run / "checkpoint.pth"), "--repository", str(repository),
            "--name", "tiny", "--quiet")
    return repository / "tiny"


@pytest.fixture(scope="session")
def server(bundle, tmp_path_factory):
    """`dinoserve serve` of the tiny bundle (embedded Triton + gateway), ready to answer."""
    srv = Server(bundle, tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
