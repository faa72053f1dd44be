"""A small logistic classifier over sentence embeddings and rule features, kept as JSON.

JSON, not pickle: the file is data a reviewer can read, and loading it runs no code. The fit is
L2-regularised logistic regression (L-BFGS, PyTorch), with per-example weights so that classes
(and the hard negatives) count as much as the training set says they should.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loraforge.errors import ConfigError
from loraforge.files import write_text_atomic

FORMAT = 1


@dataclass
class LogisticModel:
    """``p = sigmoid(weights · x + bias)``; ``x`` is described by ``features``."""

    features: list[str]
    weights: list[float]
    bias: float
    threshold: float = 0.5
    meta: dict[str, Any] = field(default_factory=dict)  # what it was trained on, its measured figures

    def __post_init__(self) -> None:
        self._w = np.asarray(self.weights, dtype=np.float32)

    def probability(self, x: np.ndarray) -> np.ndarray:
        """One probability per row of ``x`` (shape (n, len(features)))."""
        z = x.astype(np.float32) @ self._w + np.float32(self.bias)
        p: np.ndarray = 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))
        return p

    def save(self, path: Path) -> None:
        data = {"format": FORMAT, **asdict(self)}
        write_text_atomic(path, json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> LogisticModel:
        """Raises ConfigError naming the file when it is missing or not a model of this format."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read the guard model {path}: {e}") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f"{path} is not a guard model of format {FORMAT}")
        try:
            model = cls(
                features=[str(f) for f in data["features"]],
                weights=[float(w) for w in data["weights"]],
                bias=float(data["bias"]),
                threshold=float(data["threshold"]),
                meta=dict(data.get("meta") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path} is not a valid guard model: {e}") from e
        if len(model.weights) != len(model.features) or not all(math.isfinite(w) for w in model.weights):
            count = len(model.features)
            raise ConfigError(f"{path}: {count} finite weights expected, one per feature; got {len(model.weights)}")
        return model


def fit(
    x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray, *, l2: float = 1e-3, max_iter: int = 500
) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression; returns (weights, bias). Deterministic for the same data."""
    import torch

    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.float64)
    wt = torch.as_tensor(sample_weight / sample_weight.sum(), dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        logits = xt @ w + b
        loss = (wt * torch.nn.functional.binary_cross_entropy_with_logits(logits, yt, reduction="none")).sum()
        loss = loss + l2 * (w * w).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    with torch.enable_grad():
        optimiser.step(closure)  # type: ignore[no-untyped-call]
    return w.detach().numpy().astype(np.float32), float(b.detach().item())
