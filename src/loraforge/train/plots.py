"""The loss-curve picture of a run (PNG), drawn from its metrics records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraforge.files import write_bytes_atomic


def plot_loss_curve(records: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Draw training loss per step and validation loss at each evaluation into ``path``."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss", color="#3b6ea8", linewidth=1.4)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss", color="#d9822b", linewidth=1.6)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per trained token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return path
