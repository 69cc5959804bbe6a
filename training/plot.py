"""``dinoserve plot RUN_DIR``: a training run's curves in one PNG.

Panels: the loss (with iBOT's CLS and patch parts), the schedules (learning rate, weight decay, teacher
EMA rate and temperature), the collapse indicators (teacher entropy and KL from uniform, with log K
drawn: entropy at log K means a uniform collapse, KL at log K a one-prototype collapse; for the methods
of ``methods.py`` the spread of the normalised embeddings, 0 when collapsed), throughput, and the k-NN
monitor's accuracy when the run had one.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path


def _read_metrics(run_dir: Path) -> dict[str, list[float]]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} the output directory of `dinoserve train`?")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} has no steps yet")
    return {key: [float(r[key]) if r.get(key) not in (None, "") else math.nan for r in rows] for key in rows[0]}


def plot_run(run_dir: Path, output: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    m = _read_metrics(run_dir)
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
    epochs_log = []
    if (run_dir / "log.jsonl").is_file():
        epochs_log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line]
    knn = [(e["epoch"], e["knn_top1"]) for e in epochs_log if "knn_top1" in e]

    steps = m["step"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    title = f"{config.get('method', '?')} · {config.get('arch', '?')}/{config.get('patch_size', '?')} · {run_dir.name}"
    fig.suptitle(title)

    ax = axes[0, 0]
    ax.plot(steps, m["loss"], label="loss", lw=1)
    for key in ("cls_loss", "patch_loss"):
        if key in m:
            ax.plot(steps, m[key], label=key, lw=1)
    ax.set_title("loss")
    ax.legend()

    ax = axes[0, 1]
    ax.plot(steps, m["lr"], label="learning rate")
    ax.set_title("learning rate")
    ax2 = ax.twinx()
    ax2.plot(steps, m["wd"], color="tab:orange", label="weight decay")
    ax2.set_ylabel("weight decay")

    ax = axes[0, 2]
    if "momentum" in m:  # SimCLR, SimSiam and SwAV have no momentum encoder
        ax.plot(steps, m["momentum"], label="teacher EMA rate")
    ax.set_title("teacher EMA rate and temperature")
    if "teacher_temp" in m:
        ax2 = ax.twinx()
        ax2.plot(steps, m["teacher_temp"], color="tab:green", label="teacher temperature")
        if "teacher_patch_temp" in m:
            ax2.plot(steps, m["teacher_patch_temp"], color="tab:red", label="patch temperature")
        ax2.legend(loc="lower right")

    ax = axes[1, 0]
    if "teacher_entropy" in m:
        ax.plot(steps, m["teacher_entropy"], label="teacher entropy")
        ax.plot(steps, m["teacher_kl_uniform"], label="KL(mean teacher || uniform)")
        if config.get("out_dim"):
            ax.axhline(math.log(config["out_dim"]), color="grey", ls="--", lw=1, label="log K")
        ax.set_title("collapse indicators (nats)")
    else:
        ax.plot(steps, m["embedding_std"], label="std of normalised embeddings")
        if config.get("bottleneck_dim"):
            ax.axhline(config["bottleneck_dim"] ** -0.5, color="grey", ls="--", lw=1, label="1/sqrt(dim): spread")
        ax.set_title("collapse indicator (0: collapsed)")
    ax.legend()

    ax = axes[1, 1]
    ax.plot(steps, m["images_per_s"], lw=1)
    ax.set_title("throughput (images/s)")

    ax = axes[1, 2]
    if knn:
        ax.plot([e for e, _ in knn], [t for _, t in knn], marker="o")
        ax.set_xlabel("epoch")
        ax.set_title("k-NN monitor top-1 (%)")
    else:
        ax.set_title("k-NN monitor: off (--knn-every)")
        ax.axis("off")
    for ax in axes.flat[:5]:
        ax.set_xlabel("step")
    fig.tight_layout()
    output = Path(output) if output else run_dir / "curves.png"
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
