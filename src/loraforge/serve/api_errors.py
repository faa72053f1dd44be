"""Errors as the HTTP API answers them: OpenAI's ``{"error": {...}}`` with a status, and server-sent events.

The service raises :class:`APIError`; the app's one exception handler turns it into a response.
"""

from __future__ import annotations

import json
import re
from typing import Any

from loraforge.errors import LoraforgeError

STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(LoraforgeError):
    """An error answered to the client as ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": STATUS_TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }


_PATH = re.compile(r"(?<![\w.])/(?:[^\s'\"/:]+/)*([^\s'\"/:]+)")


def public_message(error: Exception) -> str:
    """``error``'s message without absolute paths (each becomes its last component): what a
    client may read about a file of the server's."""
    return _PATH.sub(r"\1", str(error))


def engine_unavailable() -> APIError:
    return APIError(503, "the inference engine is not running; retry shortly", code="engine_down", retry_after=5)


def not_found(model: str) -> APIError:
    # The same answer for a missing adapter and another tenant's adapter: no existence leak.
    return APIError(
        404,
        f"The model '{model}' does not exist or you do not have access to it.",
        code="model_not_found",
        param="model",
    )


def sse(item: dict[str, Any]) -> str:
    return f"data: {json.dumps(item, separators=(',', ':'))}\n\n"
