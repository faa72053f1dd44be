"""The HTTP layer: thin routes over ``InferenceService``, one error handler, auth, body limits.

Endpoints::

    POST /v1/chat/completions   POST /v1/completions     GET /v1/models[/{id}]   GET /v1/usage
    POST /v1/feedback           (an end user's rating of a response: serve/feedback.py)
    GET  /health  /ready  /metrics
    GET  /v1/admin/adapters  POST /v1/admin/adapters/load  POST /v1/admin/adapters/unload
         (admin keys only, and only when ``admin_endpoints`` is switched on)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, MutableMapping
from dataclasses import asdict
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraforge.govern.audit import AuditLog
from loraforge.govern.deploy import Deployments
from loraforge.govern.pilot import Pilots
from loraforge.govern.release import Release
from loraforge.govern.review import Reviews
from loraforge.jobs.files import FileService
from loraforge.jobs.service import JobService
from loraforge.serve.adapter_cache import AdapterCache
from loraforge.serve.adapters import AdapterStore, Registration
from loraforge.serve.api_errors import APIError, not_found, sse
from loraforge.serve.config import ServeConfig
from loraforge.serve.feedback import FeedbackBody, FeedbackBook
from loraforge.serve.jobs_routes import add_jobs_routes
from loraforge.serve.keys import KeyRecord, KeyStore
from loraforge.serve.protocol import ChatCompletionRequest, CompletionRequest, LoadRequest
from loraforge.serve.release_routes import add_release_routes
from loraforge.serve.service import InferenceService
from loraforge.serve.telemetry import Metrics

log = logging.getLogger("loraforge.serve")
LIMITED = ("/v1/chat/completions", "/v1/completions")
UPLOADS = (
    "/v1/files"  # streamed, with its own size limit (max_upload_bytes)  # the routes a key's request limits apply to
)
ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/usage",
    "/v1/feedback",
    "/health",
    "/ready",
    "/metrics",
    "/v1/admin/adapters",
    "/v1/admin/adapters/load",
    "/v1/admin/adapters/unload",
    "/v1/files",
    "/v1/fine_tuning/jobs",
)


class Envelope:
    """ASGI middleware: request ids, the body size limit, and per-route request metrics.

    Written against raw ASGI (not ``BaseHTTPMiddleware``) so that streaming responses and
    client disconnects pass through untouched.
    """

    def __init__(
        self,
        app: Any,
        *,
        max_body_bytes: int,
        metrics: Metrics,
        refuse: Callable[[str], APIError | None] = lambda _: None,
        max_upload_bytes: int = 0,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes
        self.metrics = metrics
        self.refuse = refuse  # the Authorization header → an error to answer before the body is read

    async def _too_large(self, scope: dict[str, Any], receive: Any, send: Any, limit: int | None = None) -> None:
        self.metrics.errors.labels("body_too_large").inc()
        limit = limit or self.max_body_bytes
        error = APIError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
        await JSONResponse(error.body(), status_code=413, headers={"Connection": "close"})(scope, receive, send)

    def _counted(self, receive: Any) -> Any:
        """``receive`` for an upload: past ``max_upload_bytes`` (a chunked body declares no length) it fails."""
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_upload_bytes:
                raise APIError(
                    413,
                    f"the upload is larger than this server's limit of {self.max_upload_bytes} bytes",
                    code="file_too_large",
                    param="file",
                )
            return message

        return counted

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        path = scope.get("path", "")
        route = "/v1/models/{id}" if path.startswith("/v1/models/") else path if path in ROUTES else "other"
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            refused = self.refuse(headers.get(b"authorization", b"").decode("latin-1")) if path in LIMITED else None
            if refused is not None:  # a rate-limited key: answered before its body is read or parsed
                self.metrics.errors.labels(refused.code or str(refused.status)).inc()
                response = JSONResponse(refused.body(), status_code=refused.status, headers=_retry(refused))
                await response(scope, receive, send_with_id)
                return
            length = headers.get(b"content-length")
            if path == UPLOADS and scope.get("method") == "POST":
                # an upload is streamed to disk, never held here: its bytes are counted on the way
                if length is not None and (not length.isdigit() or int(length) > self.max_upload_bytes):
                    await self._too_large(scope, receive, send_with_id, self.max_upload_bytes)
                    return
                await self.app(scope, self._counted(receive), send_with_id)
                return
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                await self._too_large(scope, receive, send_with_id)
                return
            # The whole body is read here, within the limit, whatever its transfer encoding (a
            # chunked body declares no length): the app then gets it in one message.
            body = bytearray()
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    status = 499  # the client left before sending its body
                    return
                body += message.get("body", b"")
                if len(body) > self.max_body_bytes:
                    await self._too_large(scope, receive, send_with_id)
                    return
                if not message.get("more_body", False):
                    break
            replayed = False

            async def replay() -> dict[str, Any]:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": bytes(body), "more_body": False}
                return dict(await receive())  # after the body: only the disconnect is left

            await self.app(scope, replay, send_with_id)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


def create_app(
    config: ServeConfig,
    service: InferenceService,
    *,
    keys: KeyStore,
    store: AdapterStore,
    cache: AdapterCache | None,
    audit: AuditLog,
    metrics: Metrics,
    release: Release,
    deployments: Deployments,
    files: FileService | None = None,
    jobs: JobService | None = None,
    reviews: Reviews | None = None,
) -> FastAPI:
    """Build the application; every dependency is handed in (no module-level state)."""
    app = FastAPI(title="loraforge", docs_url=None, redoc_url=None, openapi_url=None)
    feedback = FeedbackBook(service.usage.registry, metrics)
    if config.admin_endpoints:
        log.warning("admin endpoints are ON: admin keys can load and unload adapters over HTTP")

    # -- errors: every failure leaves in OpenAI's shape ----------------------------------------

    def error_response(err: APIError) -> JSONResponse:
        metrics.errors.labels(err.code or str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status, headers=_retry(err))

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            message, param = "The request body is not valid JSON.", None
        else:
            param = ".".join(loc) or None
            message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
            if "input" in first and first.get("type") != "missing":
                message += f" (got {json.dumps(first['input'], default=str)[:100]})"
        return error_response(APIError(400, message, param=param, code="invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(err.status_code, str(err.detail), code=f"http_{err.status_code}"))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(APIError(500, "internal server error", code="internal_error"))

    def refuse(authorization: str) -> APIError | None:
        scheme, _, token = authorization.partition(" ")
        record = keys.authenticate(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if record is None:
            return None  # the route answers 401 with its own message
        limited = service.limiter.refuses(record.id)
        if limited is None:
            return None
        return APIError(429, str(limited), code="rate_limit_exceeded", retry_after=limited.retry_after)

    app.add_middleware(
        Envelope,
        max_body_bytes=config.max_body_bytes,
        max_upload_bytes=config.max_upload_bytes,
        metrics=metrics,
        refuse=refuse,
    )

    # -- auth ----------------------------------------------------------------------------------

    def caller(request: Request) -> KeyRecord:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "Missing API key: send 'Authorization: Bearer KEY'.", code="missing_api_key")
        record = keys.authenticate(token.strip())
        if record is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return record

    def user(request: Request) -> KeyRecord:
        """A key that may use models and train: any role but an auditor's (read-only)."""
        record = caller(request)
        if record.role == "auditor":
            raise APIError(403, "An auditor's key reads reports and logs only.", code="read_only_key")
        return record

    if files is not None and jobs is not None:
        add_jobs_routes(app, user, files, jobs, audit)

    def admin_enabled(request: Request) -> None:
        if not config.admin_endpoints:
            raise APIError(404, f"{request.url.path} does not exist", code="not_found")

    def admin(request: Request) -> KeyRecord:
        admin_enabled(request)
        record = caller(request)
        if record.role != "admin":
            raise APIError(403, "This endpoint needs an admin key.", code="admin_required")
        return record

    def global_admin(record: KeyRecord, what: str) -> None:
        """Refuse ``what`` to any key but an admin key for all tenants (``keys create --global``)."""
        if record.role != "admin" or not record.all_tenants:
            raise APIError(
                403,
                f"{what} needs an admin key for all tenants (loraforge keys create --global).",
                code="admin_required",
            )

    def administered(record: KeyRecord, name: str) -> Registration:
        """The registration ``name`` if this admin key may manage it (its tenant's or public), else 404."""
        reg = store.get(name)
        if reg is None or not (record.all_tenants or reg.visible_to(record.tenant)):
            raise not_found(name)
        return reg

    # -- routes --------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict[str, Any]:
        if not service.engine.alive():
            raise APIError(503, "the inference engine is not running", code="engine_down", retry_after=5)
        stats = service.engine.stats()  # only the load: the prefix cache's figures are for /metrics (admins)
        return {
            "status": "ready",
            "model": service.engine.model_id,
            "queue_depth": stats["queue_depth"],
            "batch_size": stats["batch_size"],
        }

    @app.get("/metrics")
    async def metrics_endpoint(request: Request) -> Response:
        if not config.public_metrics:  # it names every tenant and adapter
            global_admin(caller(request), "/metrics (or public_metrics: true)")
        stats = service.engine.stats()
        metrics.queue_depth.set(stats["queue_depth"])
        metrics.batch_size.set(stats["batch_size"])
        metrics.preemptions.set(stats.get("preemptions", 0))
        metrics.loaded_adapters.set(len(cache.loaded()) if cache else 0)
        if "prefix_cache_bytes" in stats:
            metrics.prefix_cache_bytes.set(stats["prefix_cache_bytes"])
            looked_up = max(1, stats["prefix_cache_prompt_tokens"])
            metrics.prefix_cache_hit_ratio.set(stats["prefix_cache_hit_tokens"] / looked_up)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(key: KeyRecord = Depends(caller)) -> dict[str, Any]:  # noqa: B008
        return {"object": "list", "data": [card.to_json() for card in service.catalog.models(key)]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, key: KeyRecord = Depends(caller)) -> dict[str, Any]:  # noqa: B008
        return service.catalog.model(key, model_id).to_json()

    async def respond(request: Request, stream: bool, items: AsyncIterator[dict[str, Any]]) -> Response:
        if not stream:
            # The work is cancelled if the client leaves: nobody would read its answer.
            work = asyncio.ensure_future(_last(items))
            gone = asyncio.ensure_future(_disconnected(request))
            try:
                await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, APIError):
                    await work
                return Response(status_code=499)
            return JSONResponse(work.result())
        # Fail before the first byte when we can (rate limits, engine errors at admission).
        first = await anext(items)

        async def events() -> AsyncIterator[str]:
            try:
                yield sse(first)
                async for item in items:
                    yield sse(item)
                yield "data: [DONE]\n\n"
            except APIError as e:  # headers are gone: report in the stream, OpenAI-style
                yield sse(e.body())
            finally:
                await items.aclose()  # type: ignore[attr-defined]

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat(request: Request, req: ChatCompletionRequest, key: KeyRecord = Depends(user)) -> Response:  # noqa: B008
        _, items = await service.chat(key, req, user=end_user(request))
        return await respond(request, req.stream, items)

    @app.post("/v1/completions")
    async def completions(request: Request, req: CompletionRequest, key: KeyRecord = Depends(user)) -> Response:  # noqa: B008
        _, items = await service.completion(key, req, user=end_user(request))
        return await respond(request, req.stream, items)

    @app.post("/v1/feedback")
    async def rate(body: FeedbackBody, key: KeyRecord = Depends(user)) -> dict[str, Any]:  # noqa: B008
        return await asyncio.to_thread(feedback.rate, key, body)

    @app.get("/v1/usage")
    async def usage(request: Request, key: KeyRecord = Depends(caller)) -> dict[str, Any]:  # noqa: B008
        tenant = request.query_params.get("tenant", key.tenant)
        if tenant != key.tenant:
            global_admin(key, "Reading another tenant's usage")
        return service.usage.summary(tenant)

    @app.get("/v1/admin/adapters")
    async def admin_adapters(key: KeyRecord = Depends(admin)) -> dict[str, Any]:  # noqa: B008
        loaded = set(cache.loaded()) if cache else set()
        mine = [r for r in store.registrations() if key.all_tenants or r.visible_to(key.tenant)]
        return {"data": [{**asdict(r), "loaded": r.name in loaded} for r in mine]}

    @app.post("/v1/admin/adapters/load")
    async def admin_load(req: LoadRequest, key: KeyRecord = Depends(admin)) -> dict[str, Any]:  # noqa: B008
        reg = administered(key, req.name)
        with audit.action(f"key:{key.id}", "adapter.load", req.name, tenant=key.tenant):
            await service.catalog.load(reg)
        return {"name": req.name, "loaded": True}

    @app.post("/v1/admin/adapters/unload")
    async def admin_unload(req: LoadRequest, key: KeyRecord = Depends(admin)) -> dict[str, Any]:  # noqa: B008
        administered(key, req.name)
        with audit.action(f"key:{key.id}", "adapter.unload", req.name, tenant=key.tenant):
            if cache is None or not cache.unload(req.name):
                raise APIError(404, f"adapter {req.name!r} is not loaded", code="not_loaded", param="name")
        return {"name": req.name, "loaded": False}

    reviews = reviews or Reviews(release.registry, audit)
    add_release_routes(app, caller, admin_enabled, release, deployments, Pilots(deployments), reviews)
    return app


def end_user(request: Request) -> str | None:
    """The ``X-End-User`` header: the end user's id for a client that cannot set the ``user`` field."""
    return request.headers.get("x-end-user", "").strip() or None


def _retry(err: APIError) -> dict[str, str] | None:
    return {"Retry-After": str(err.retry_after)} if err.retry_after and err.status in (429, 503) else None


async def _last(items: AsyncIterator[dict[str, Any]]) -> dict[str, Any] | None:
    body = None
    async for item in items:
        body = item
    return body


async def _disconnected(request: Request) -> None:
    """Return when the client has gone (the body is read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
