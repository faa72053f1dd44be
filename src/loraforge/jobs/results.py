"""A job's training metrics in OpenAI's names: for events, checkpoints and the results CSV.

``metrics.jsonl`` (written by ``loraforge train``) holds ``train`` records (``step``, ``loss``,
``tokens``, optionally ``accuracy``) and ``eval`` records (``step``, ``val_loss``, optionally
``val_accuracy``). loraforge computes validation loss over the whole validation set, so
``valid_loss`` and ``full_valid_loss`` carry the same measurement; a metric training did not record
is null, never guessed.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

CSV_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The complete records of ``metrics.jsonl`` (a line being written is skipped); [] when absent."""
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def openai_metrics(records: list[dict[str, Any]], step: int) -> dict[str, Any]:
    """The metrics at ``step``: the training record of that step and the latest evaluation up to it."""
    train = next((r for r in records if r.get("kind") == "train" and r["step"] == step), None)
    evals = [r for r in records if r.get("kind") == "eval" and r["step"] <= step]
    last_eval = evals[-1] if evals else None
    valid = last_eval["val_loss"] if last_eval else None
    valid_acc = last_eval.get("val_accuracy") if last_eval else None
    return {
        "step": step,
        "train_loss": train["loss"] if train else None,
        "train_mean_token_accuracy": train.get("accuracy") if train else None,
        "valid_loss": valid,
        "valid_mean_token_accuracy": valid_acc,
        "full_valid_loss": valid,
        "full_valid_mean_token_accuracy": valid_acc,
    }


def metrics_csv(records: list[dict[str, Any]]) -> str:
    """OpenAI's results file: one row per training step, validation columns where an evaluation ran."""
    evals = {r["step"]: r for r in records if r.get("kind") == "eval"}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in records:
        if r.get("kind") != "train":
            continue
        ev = evals.get(r["step"], {})
        writer.writerow(
            [
                r["step"],
                r["loss"],
                _blank(r.get("accuracy")),
                _blank(ev.get("val_loss")),
                _blank(ev.get("val_accuracy")),
            ]
        )
    return out.getvalue()


def _blank(value: Any) -> Any:
    return "" if value is None else value
