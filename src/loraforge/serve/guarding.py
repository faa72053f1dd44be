"""Input guardrails in the server: a policy decides, per tenant, what a hit of a check does.

The policy is a YAML file (``guard_policy`` in the server's config), read at start and again when it
changes; a malformed one stops the start with its line (a malformed change is logged and the
policy in force kept)::

    default:
      prompt_injection: {action: block}            # block, flag or allow; threshold optional
    tenants:
      research-lab:
        prompt_injection: {action: flag, threshold: 0.9}

The check reads the request's user and tool messages (where injections arrive: typed, or inside
documents and tools' output), and a completion's prompts; the operator's system messages are not
judged. ``block`` answers 400 ``content_policy_violation`` naming the check and its score, never
the text; ``flag`` lets the request through. Both are written to the audit log with the request's
id, tenant, model, check and score, queued for review (``govern/review.py``: the message, personal
data and secrets redacted), and counted in Prometheus (``loraforge_guard_events``). The
detector runs on the engine's thread (between two decode steps), like every tensor operation of
the server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from loraforge.errors import ConfigError
from loraforge.files import sha256_file
from loraforge.govern.audit import AuditLog
from loraforge.govern.review import Reviews
from loraforge.serve.api_errors import APIError
from loraforge.serve.keys import KeyRecord
from loraforge.serve.telemetry import Metrics

log = logging.getLogger("loraforge.serve")
T = TypeVar("T")
CHECKS = ("prompt_injection",)
ACTIONS = ("block", "flag", "allow")
SCREENED_ROLES = ("user", "tool", "function")
RELOAD_CHECK_S = 1.0  # how often the policy file is looked at for changes


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class CheckPolicy:
    action: str = "allow"
    threshold: float | None = None  # None: the detector's own


@dataclass
class GuardPolicy:
    default: dict[str, CheckPolicy] = field(default_factory=dict)
    tenants: dict[str, dict[str, CheckPolicy]] = field(default_factory=dict)

    def rule(self, tenant: str, check: str) -> CheckPolicy:
        return self.tenants.get(tenant, {}).get(check) or self.default.get(check) or CheckPolicy()

    def to_json(self) -> dict[str, Any]:
        def rules(checks: dict[str, CheckPolicy]) -> dict[str, Any]:
            return {k: {"action": v.action, "threshold": v.threshold} for k, v in checks.items()}

        return {"default": rules(self.default), "tenants": {t: rules(c) for t, c in self.tenants.items()}}

    def active(self) -> bool:
        rules = [*self.default.values(), *(r for t in self.tenants.values() for r in t.values())]
        return any(r.action != "allow" for r in rules)

    @classmethod
    def load(cls, path: Path) -> GuardPolicy:
        """Raises ConfigError naming the file, the line and what is wrong."""
        try:
            node = yaml.compose(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"cannot read the guard policy {path}: {e}") from e
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from e
        if node is None:
            return cls()
        top = _mapping(node, path, "the policy")
        unknown = sorted(set(top) - {"default", "tenants"})
        if unknown:
            raise ConfigError(f"{path}:{_line(top[unknown[0]])}: unknown key {unknown[0]!r}; use default and tenants")
        policy = cls()
        if "default" in top:
            policy.default = _checks(top["default"], path, "default")
        if "tenants" in top:
            for tenant, value in _mapping(top["tenants"], path, "tenants").items():
                policy.tenants[tenant] = _checks(value, path, f"tenants.{tenant}")
        return policy


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _mapping(node: yaml.Node, path: Path, what: str) -> dict[str, yaml.Node]:
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{path}:{_line(node)}: {what} must be a mapping")
    return {str(k.value): v for k, v in node.value}


def _checks(node: yaml.Node, path: Path, where: str) -> dict[str, CheckPolicy]:
    out = {}
    for check, value in _mapping(node, path, where).items():
        if check not in CHECKS:
            raise ConfigError(f"{path}:{_line(value)}: {where}: unknown check {check!r}; known: {', '.join(CHECKS)}")
        fields = {k: yaml.safe_load(yaml.serialize(v)) for k, v in _mapping(value, path, f"{where}.{check}").items()}
        action, threshold = fields.pop("action", None), fields.pop("threshold", None)
        if fields:
            raise ConfigError(f"{path}:{_line(value)}: {where}.{check}: unknown key(s) {', '.join(sorted(fields))}")
        if action not in ACTIONS:
            raise ConfigError(f"{path}:{_line(value)}: {where}.{check}.action must be one of {', '.join(ACTIONS)}")
        if threshold is not None and (not isinstance(threshold, int | float) or not 0 < threshold < 1):
            raise ConfigError(f"{path}:{_line(value)}: {where}.{check}.threshold must be a number between 0 and 1")
        out[check] = CheckPolicy(str(action), None if threshold is None else float(threshold))
    return out


class InputGuard:
    """Screens requests' messages under the policy in ``path``, read again when the file changes.

    Args:
        run: runs a function on the engine's thread and returns its result (``LocalEngine.call``).
        detector: builds the injection detector (default: the shipped one), called once at ``start``.

    Raises:
        ConfigError: the policy file is malformed (at start; a malformed change later is logged and
            the policy in force kept).
    """

    def __init__(
        self,
        path: Path,
        *,
        audit: AuditLog,
        metrics: Metrics,
        run: Callable[[Callable[[], Any]], Any],
        reviews: Reviews | None = None,
        detector: Callable[[], Any] | None = None,
    ) -> None:
        self.path = path
        self.reviews = reviews
        self.audit = audit
        self.metrics = metrics
        self.run = run
        self._build = detector
        self.detector: Any = None
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self.policy = self._load()

    def _load(self) -> GuardPolicy:
        """Read the policy file and record it in the audit log (the policy in force, for the audit
        trail and the compliance report's guardrail evidence)."""
        stamp = _stamp(self.path)
        policy = GuardPolicy.load(self.path)
        digest = sha256_file(self.path)
        self.audit.record("server", "guard.policy", f"guard-policy:{digest[:16]}", sha256=digest, **policy.to_json())
        self._stamp = stamp
        return policy

    def current(self) -> GuardPolicy:
        """The policy in force: the file is looked at once a second at most, and read again when it
        changed (its inode, size or modification time). A malformed new version is logged, once,
        and the policy in force kept."""
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_S:
            return self.policy
        self._checked = now
        try:
            stamp = _stamp(self.path)
        except OSError as e:
            log.error("guard: cannot read the policy %s (%s); keeping the one in force", self.path, e)
            return self.policy
        if stamp != self._stamp:
            try:
                self.policy = self._load()
                log.info("guard: policy %s reloaded", self.path)
            except ConfigError as e:
                self._stamp = stamp  # said once for this version of the file
                log.error("guard: %s; keeping the policy in force", e)
        return self.policy

    def start(self) -> None:
        """Load the detector now (a few seconds), so that the first request does not wait for it."""
        if self.detector is None and self.policy.active():
            from loraforge.guard.injection import shared_detector

            self.detector = self.run(self._build or shared_detector)
            log.info("guard: prompt_injection check loaded (threshold %.2f)", self.detector.threshold)

    async def screen(self, key: KeyRecord, model: str, request_id: str, messages: Sequence[tuple[str, str]]) -> None:
        """Check ``messages`` ((role, text) pairs) under the key's tenant's policy.

        Raises:
            APIError: 400 ``content_policy_violation`` when a check blocks the request.
        """
        rule = self.current().rule(key.tenant, "prompt_injection")
        texts = [(i, text) for i, (role, text) in enumerate(messages) if role in SCREENED_ROLES and text.strip()]
        if rule.action == "allow" or not texts:
            return
        if self.detector is None:  # a policy changed to block or flag: the detector loads now
            await asyncio.to_thread(self.start)
        detector = self.detector
        verdicts = await asyncio.to_thread(
            self.run, lambda: detector.check_many([t for _, t in texts], scope=key.tenant)
        )
        threshold = detector.threshold if rule.threshold is None else rule.threshold
        score, index = max((v.score, i) for v, (i, _) in zip(verdicts, texts, strict=True))
        if score < threshold:
            return
        role, text = messages[index]
        self.metrics.guard_events.labels("prompt_injection", rule.action, key.tenant, model).inc()
        review = None
        if self.reviews is not None:
            review = await asyncio.to_thread(
                self.reviews.add,
                request_id=request_id,
                tenant=key.tenant,
                key_id=key.id,
                model=model,
                check="prompt_injection",
                action=rule.action,
                score=round(score, 4),
                threshold=threshold,
                role=role,
                message=index,
                text=text,
            )
        self.audit.record(
            f"key:{key.id}",
            f"guard.{rule.action}",
            request_id,
            tenant=key.tenant,
            model=model,
            check="prompt_injection",
            score=round(score, 4),
            threshold=threshold,
            message=index,
            role=role,
            review=review,
        )
        if rule.action == "block":
            raise APIError(
                400,
                f"this request was blocked by the server's prompt_injection check: message {index} ({role}) "
                f"scored {score:.2f}, at or above {threshold:.2f}. Rephrase it without instructions addressed "
                f"to the assistant, or ask the operator to review request {request_id}",
                code="content_policy_violation",
                param="messages",
            )
