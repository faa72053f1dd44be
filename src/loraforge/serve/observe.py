"""What the server watches of each answered request, per model and adapter: refusals and input drift.

Every finished call is scored here before it is metered: whether its answer refused
(``evaluate.refusal``, the classifier the safety suite uses) and how unlike the adapter's training
prompts its prompt is (``data.drift``, with the ``input_profile.json`` training wrote beside the
adapter). Each adapter has a window of its latest prompts; its unfamiliar share, the alert
threshold and the alert itself are Prometheus gauges, and the per-request figures go to
``usage_records`` (``loraforge monitor`` reads them back, across restarts and servers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from loraforge.data.drift import DEFAULT_WINDOW, DriftWindow, read_profile
from loraforge.errors import ConfigError
from loraforge.evaluate.refusal import is_refusal
from loraforge.serve.adapters import AdapterStore, Registration
from loraforge.serve.telemetry import Metrics

log = logging.getLogger("loraforge.serve")
BASE = "base"  # the ``adapter`` label of answers of the base model
MAX_ANSWER_CHARS = 4000  # the refusal classifier reads the start of an answer; no more is kept


@dataclass(frozen=True)
class Observation:
    refusal: bool | None  # None: no answer to judge (an error, or a scoring request)
    novelty: float | None  # None: the adapter has no input profile (the base model, an older adapter)
    unfamiliar: bool | None


class Observer:
    """Per-adapter drift windows over ``store``'s adapters, reported to ``metrics``.

    Args:
        window: prompts per drift window (``monitor_window`` in the server's config).
    """

    def __init__(self, store: AdapterStore, metrics: Metrics, *, window: int = DEFAULT_WINDOW) -> None:
        self.store = store
        self.metrics = metrics
        self.window = window
        # one window per registration (a name registered again starts a new window)
        self._windows: dict[tuple[str, str, float], DriftWindow | None] = {}

    def _drift(self, reg: Registration) -> DriftWindow | None:
        scope = (reg.name, reg.weights_sha256, reg.added_at)
        if scope not in self._windows:
            try:
                profile = read_profile(self.store.path(reg.name))
            except ConfigError as e:
                log.warning("adapter %s: input drift is not watched: %s", reg.name, e)
                profile = None
            self._windows = {k: v for k, v in self._windows.items() if k[0] != reg.name}
            self._windows[scope] = DriftWindow(profile, self.window) if profile is not None else None
        return self._windows[scope]

    def observe(self, reg: Registration | None, prompt: str | None, answer: str | None) -> Observation:
        """Score one finished call: its answer (None: no answer) and its prompt's text (None: token ids)."""
        label = reg.name if reg is not None else BASE
        refusal = None
        if answer is not None:
            refusal = is_refusal(answer)
            self.metrics.answers.labels(label).inc()
            if refusal:
                self.metrics.refusals.labels(label).inc()
        window = self._drift(reg) if reg is not None and prompt else None
        if window is None or prompt is None:
            return Observation(refusal, None, None)
        novelty = window.add(prompt)
        self.metrics.unfamiliar_share.labels(label).set(window.share)
        self.metrics.drift_threshold.labels(label).set(window.threshold)
        self.metrics.drift_alert.labels(label).set(1 if window.alert else 0)
        return Observation(refusal, round(novelty, 4), novelty > window.profile.line)

    def drift(self, name: str) -> dict[str, object] | None:
        """The current window of adapter ``name`` (None: not watched, or no prompt yet)."""
        for (adapter, *_), window in self._windows.items():
            if adapter == name and window is not None:
                return window.to_json()
        return None
