"""Training the injection detector, and the figures it is judged by, on the split it never saw.

``train`` builds the labelled examples (``dataset.py``), keeps the held-out families apart, picks
the regularisation and the threshold on out-of-fold scores of the *training* families (five folds
by family; the threshold keeps the false-positive rate on hard negatives and harmless documents
≤ ``MAX_HARD_FPR`` where it can), fits the classifier on all training families, and measures it on
the held-out ones. The same seed gives the same weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loraforge.errors import DataError
from loraforge.guard.classifier import LogisticModel, fit
from loraforge.guard.dataset import KINDS, Example, build
from loraforge.guard.embed import PACKAGE, VERSION, Embedder
from loraforge.guard.injection import InjectionDetector, feature_names

MAX_HARD_FPR = 0.02
HARD = ("hard_negative", "document")  # harmless text that looks like an attack or carries one's shape
L2_CHOICES = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2)


@dataclass
class Figures:
    """A detector's figures on a set of examples at one threshold."""

    items: int
    precision: float
    recall: float
    balanced_accuracy: float
    hard_negative_fpr: float
    recall_by_kind: dict[str, float]
    fpr_by_kind: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def figures(examples: list[Example], flagged: list[bool]) -> Figures:
    """Precision, recall, balanced accuracy, false positives on hard negatives, per kind."""
    y = np.array([e.label for e in examples], dtype=bool)
    f = np.array(flagged, dtype=bool)
    tp, fp = int((y & f).sum()), int((~y & f).sum())
    pos, neg = int(y.sum()), int((~y).sum())
    recall = tp / pos if pos else 0.0
    specificity = 1 - fp / neg if neg else 1.0
    hard = [i for i, e in enumerate(examples) if e.kind in HARD]

    def rate(kind: str) -> float:
        idx = [i for i, e in enumerate(examples) if e.kind == kind]
        return sum(f[i] for i in idx) / len(idx) if idx else float("nan")

    kinds = sorted({e.kind for e in examples})
    return Figures(
        items=len(examples),
        precision=tp / (tp + fp) if tp + fp else 0.0,
        recall=recall,
        balanced_accuracy=(recall + specificity) / 2,
        hard_negative_fpr=sum(f[i] for i in hard) / len(hard) if hard else 0.0,
        recall_by_kind={k: rate(k) for k in kinds if any(e.kind == k and e.label for e in examples)},
        fpr_by_kind={k: rate(k) for k in kinds if any(e.kind == k and not e.label for e in examples)},
    )


def read_extra(path: Path) -> list[Example]:
    """A company's own examples: JSON lines with ``text`` and ``label`` (1: an injection), and
    optionally ``kind`` and ``family``. Raises DataError naming the line."""
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, label = row["text"], int(row["label"])
            if not isinstance(text, str) or not text.strip() or label not in (0, 1):
                raise ValueError("text must be a non-empty string and label 0 or 1")
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{number}: {e}; each line needs text and label (0 or 1)") from e
        kind = str(row.get("kind") or ("direct" if label else "hard_negative"))
        if kind not in KINDS:
            raise DataError(f"{path}:{number}: kind must be one of {', '.join(KINDS)}")
        family = str(row.get("family") or f"extra:{hashlib.sha256(text.encode()).hexdigest()[:6]}")
        out.append(Example(text, label, kind, f"extra:{path.name}", family))
    return out


FOLDS = 5


def _fold(family: str) -> int:
    """Which of ``FOLDS`` cross-validation folds a training family belongs to."""
    return int(hashlib.sha256(("fold/" + family).encode()).hexdigest()[:8], 16) % FOLDS


def _rows(
    detector: InjectionDetector, examples: list[Example], pieces: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training rows and their labels, from every piece's features (``pieces``: rows and the
    example of each): every piece of a harmless text is harmless; of an attack, its first piece
    (its later ones may be harmless parts of it) and, for an indirect one, the hidden instruction on
    its own. Returns (rows, labels, the example of each)."""
    rows, owners = pieces
    keep, labels, seen = [], [], set()
    for r, owner in enumerate(owners.tolist()):
        example = examples[owner]
        if not example.label or owner not in seen:
            keep.append(r)
            labels.append(example.label)
        seen.add(owner)
    x = rows[keep]
    owner_of = owners[keep]
    hidden = [i for i, e in enumerate(examples) if e.label and e.payload]
    if hidden:
        extra, extra_owners, _ = detector.features([examples[i].payload for i in hidden])
        x = np.concatenate([x, extra])
        labels += [1] * len(extra_owners)
        owner_of = np.concatenate([owner_of, np.asarray([hidden[o] for o in extra_owners], dtype=np.int64)])
    return x, np.asarray(labels, dtype=np.float64), owner_of


def _weights(examples: list[Example], owners: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Attacks and harmless texts weigh the same in all; hard negatives four times an ordinary one."""
    base = np.array([4.0 if examples[o].kind in HARD else 1.0 for o in owners])
    for value in (0, 1):
        mask = labels == value
        base[mask] *= 0.5 / base[mask].sum() if mask.any() else 0.0
    return base


def _pick_threshold(examples: list[Example], scores: np.ndarray) -> float:
    """The threshold with the best balanced accuracy whose false-positive rate on hard negatives is
    within MAX_HARD_FPR (or the lowest such rate, if none is)."""
    best: tuple[float, float, float] | None = None  # (fpr within limit, balanced accuracy, threshold)
    for threshold in np.unique(np.concatenate([np.linspace(0.05, 0.95, 91), scores])):
        fig = figures(examples, list(scores >= threshold))
        within = fig.hard_negative_fpr <= MAX_HARD_FPR
        key = (float(within), fig.balanced_accuracy if within else -fig.hard_negative_fpr, -float(threshold))
        if best is None or key > best:
            best = key
    return float(-best[2]) if best else 0.5


def _pieces(detector: InjectionDetector, examples: list[Example]) -> tuple[np.ndarray, np.ndarray]:
    """Every piece's feature row (as the detector scores texts) and the example it belongs to."""
    rows, owners, _ = detector.features([e.text for e in examples])
    return rows, np.asarray(owners, dtype=np.int64)


def _scores(model: LogisticModel, pieces: tuple[np.ndarray, np.ndarray], count: int) -> np.ndarray:
    """Each example's score: its highest piece's, as the detector scores it."""
    rows, owners = pieces
    best = np.zeros(count, dtype=np.float32)
    if len(rows):
        np.maximum.at(best, owners, model.probability(rows).astype(np.float32))
    return best


def train(
    out: Path,
    *,
    extra: list[Path] = (),  # type: ignore[assignment]
    seed: int = 0,
    limit: int | None = None,
    embedder: Embedder | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Train the detector, write it to ``out`` (JSON), and return its figures.

    Args:
        extra: JSONL files of the company's own examples (training only).
        limit: at most this many examples from each split (a quick run; the shipped weights use all).
    """
    examples = build(seed) + [e for path in extra for e in read_extra(path)]
    train_set = [e for e in examples if not e.held_out or e.source.startswith("extra:")]
    test_set = [e for e in examples if e.held_out and not e.source.startswith("extra:")]
    if limit is not None:
        rng = np.random.default_rng(seed)
        train_set = [train_set[i] for i in sorted(rng.permutation(len(train_set))[:limit])]
        test_set = [test_set[i] for i in sorted(rng.permutation(len(test_set))[:limit])]
    progress(f"{len(examples)} examples: {len(train_set)} to train ({FOLDS}-fold by family), {len(test_set)} held out")
    detector = InjectionDetector(LogisticModel([], [], 0.0), embedder or Embedder())
    names = feature_names(detector.embedder.dim)
    pieces = _pieces(detector, train_set)
    x_all, y_all, owners_all = _rows(detector, train_set, pieces)
    folds = np.array([_fold(e.family) for e in train_set])
    best: tuple[float, float, float] | None = None
    for l2 in L2_CHOICES:  # out-of-fold scores: every training example scored by a model that never saw its family
        oof = np.zeros(len(train_set), dtype=np.float32)
        for k in range(FOLDS):
            fitting = folds[owners_all] != k
            w, b = fit(x_all[fitting], y_all[fitting], _weights(train_set, owners_all[fitting], y_all[fitting]), l2=l2)
            mine = folds[pieces[1]] == k
            scored = _scores(LogisticModel(names, w.tolist(), b), (pieces[0][mine], pieces[1][mine]), len(train_set))
            oof[folds == k] = scored[folds == k]
        threshold = _pick_threshold(train_set, oof)
        fig = figures(train_set, list(oof >= threshold))
        progress(
            f"l2={l2:g}: out-of-fold balanced accuracy {fig.balanced_accuracy:.3f}, hard-negative false positives "
            f"{fig.hard_negative_fpr:.1%} at threshold {threshold:.2f}"
        )
        if best is None or fig.balanced_accuracy > best[0]:
            best = (fig.balanced_accuracy, l2, threshold)
    assert best is not None
    _, l2, threshold = best
    w, b = fit(x_all, y_all, _weights(train_set, owners_all, y_all), l2=l2)
    model = LogisticModel(names, w.tolist(), b, round(threshold, 4))
    held = figures(test_set, list(_scores(model, _pieces(detector, test_set), len(test_set)) >= model.threshold))
    model.meta = {
        "embedder": f"all-MiniLM-L6-v2 ({PACKAGE}=={VERSION})",
        "seed": seed,
        "l2": l2,
        "trained_on": {"examples": len(train_set), "attacks": sum(e.label for e in train_set)},
        "sources": sorted({e.source for e in train_set}),
        "held_out": {"examples": len(test_set), **held.as_dict()},
    }
    model.save(out)
    return model.meta
