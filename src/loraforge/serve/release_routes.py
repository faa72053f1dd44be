"""The release endpoints: approve, reject, retire, deploy, roll back, pilots, monitoring, policy,
history and reports; and the review queue of guard blocks and flags.

Each one calls the same ``govern`` code as the CLI (``loraforge approve …``), with the same checks
and the same audit records; a refusal answers with its reason and the status the rule gives (403
role or separation of duties, 404 not this key's, 409 state, 400 missing reason). They are admin
endpoints: off unless ``admin_endpoints`` is on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from loraforge.errors import ConfigError, ReleaseError
from loraforge.govern.audit_witness import RegistryWitness
from loraforge.govern.deploy import Deployments, bindings
from loraforge.govern.facts import gather
from loraforge.govern.monitor import summary
from loraforge.govern.pilot import Pilots
from loraforge.govern.release import READERS, Release, in_scope
from loraforge.govern.report_html import render
from loraforge.govern.reports import compliance_report, model_card
from loraforge.govern.review import Reviews
from loraforge.serve.api_errors import APIError
from loraforge.serve.keys import KeyRecord

T = TypeVar("T")
REASON = 2000  # characters: a reason is a sentence or a paragraph, not a document


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ApproveBody(_Body):
    reason: str | None = Field(None, max_length=REASON)
    override: str | None = Field(None, max_length=REASON)


class ReasonBody(_Body):
    reason: str = Field(max_length=REASON)


class DeployBody(_Body):
    adapter: str = Field(max_length=255)
    reason: str | None = Field(None, max_length=REASON)


class RollbackBody(_Body):
    reason: str | None = Field(None, max_length=REASON)


class PilotBody(_Body):
    adapter: str = Field(max_length=255)
    percent: int = Field(ge=1, le=99)
    reason: str | None = Field(None, max_length=REASON)


class ResolveBody(_Body):
    decision: str = Field(max_length=32)
    reason: str = Field(max_length=REASON)


class PolicyBody(_Body):
    tenant: str | None = Field(None, max_length=64)
    approvals_required: int


async def _run(step: Callable[[], T]) -> T:
    """Run a release step off the event loop; its refusal becomes the API's error."""
    try:
        return await asyncio.to_thread(step)
    except ReleaseError as e:
        raise APIError(e.status, str(e), code=e.code) from e


def add_release_routes(
    app: FastAPI,
    caller: Callable[[Request], KeyRecord],
    enabled: Callable[[Request], None],
    release: Release,
    deployments: Deployments,
    pilots: Pilots,
    reviews: Reviews,
) -> None:
    """Add the release endpoints to ``app``; ``enabled`` answers 404 when admin endpoints are off."""

    def key(request: Request) -> KeyRecord:
        enabled(request)
        return caller(request)

    def reader(request: Request) -> KeyRecord:
        record = key(request)
        if record.role not in READERS:
            raise APIError(403, "This endpoint needs an admin, approver or auditor key.", code="forbidden")
        return record

    @app.get("/v1/admin/releases/{adapter}")
    async def release_status(adapter: str, who: KeyRecord = Depends(reader)) -> dict[str, Any]:  # noqa: B008
        return await _run(lambda: release.status(who, adapter))

    @app.post("/v1/admin/adapters/{adapter}/approve")
    async def approve(adapter: str, body: ApproveBody, who: KeyRecord = Depends(key)) -> dict[str, Any]:  # noqa: B008
        step = await _run(lambda: release.approve(who, adapter, reason=body.reason, override=body.override))
        return step.to_json()

    @app.post("/v1/admin/adapters/{adapter}/reject")
    async def reject(adapter: str, body: ReasonBody, who: KeyRecord = Depends(key)) -> dict[str, Any]:  # noqa: B008
        return (await _run(lambda: release.reject(who, adapter, reason=body.reason))).to_json()

    @app.post("/v1/admin/adapters/{adapter}/retire")
    async def retire(adapter: str, body: ReasonBody, who: KeyRecord = Depends(key)) -> dict[str, Any]:  # noqa: B008
        return (await _run(lambda: release.retire(who, adapter, reason=body.reason))).to_json()

    @app.get("/v1/admin/reviews")
    async def review_list(
        status: str | None = "open",
        tenant: str | None = None,
        limit: int = 100,
        who: KeyRecord = Depends(reader),  # noqa: B008
    ) -> dict[str, Any]:
        wanted = None if status in (None, "", "all") else status
        found = await _run(lambda: reviews.list(who, status=wanted, tenant=tenant, limit=limit))
        return {"object": "list", **found}

    @app.get("/v1/admin/reviews/{review_id}")
    async def review_show(review_id: int, who: KeyRecord = Depends(reader)) -> dict[str, Any]:  # noqa: B008
        return await _run(lambda: reviews.get(who, review_id))

    @app.post("/v1/admin/reviews/{review_id}/resolve")
    async def review_resolve(
        review_id: int,
        body: ResolveBody,
        who: KeyRecord = Depends(key),  # noqa: B008
    ) -> dict[str, Any]:
        return await _run(lambda: reviews.resolve(who, review_id, body.decision, body.reason))

    @app.get("/v1/admin/routes")
    async def routes(who: KeyRecord = Depends(reader)) -> dict[str, Any]:  # noqa: B008
        found = await asyncio.to_thread(bindings, release.registry)
        return {"object": "list", "data": [b.to_json() for b in found if in_scope(who, b.tenant)]}

    @app.get("/v1/admin/routes/{route}")
    async def route_history(route: str, who: KeyRecord = Depends(reader)) -> dict[str, Any]:  # noqa: B008
        return {"route": route, "deployments": await _run(lambda: deployments.history(who, route))}

    @app.post("/v1/admin/routes/{route}/deploy")
    async def deploy(route: str, body: DeployBody, who: KeyRecord = Depends(key)) -> dict[str, Any]:  # noqa: B008
        return (await _run(lambda: deployments.deploy(who, route, body.adapter, reason=body.reason))).to_json()

    @app.post("/v1/admin/routes/{route}/rollback")
    async def rollback(route: str, body: RollbackBody, who: KeyRecord = Depends(key)) -> dict[str, Any]:  # noqa: B008
        return (await _run(lambda: deployments.rollback(who, route, reason=body.reason))).to_json()

    @app.post("/v1/admin/routes/{route}/pilot")
    async def pilot_start(route: str, body: PilotBody, who: KeyRecord = Depends(key)) -> dict[str, Any]:  # noqa: B008
        step = await _run(lambda: pilots.start(who, route, body.adapter, body.percent, reason=body.reason))
        return step.to_json()

    @app.post("/v1/admin/routes/{route}/pilot/stop")
    async def pilot_stop(route: str, body: RollbackBody, who: KeyRecord = Depends(key)) -> dict[str, Any]:  # noqa: B008
        return (await _run(lambda: pilots.stop(who, route, reason=body.reason))).to_json()

    @app.post("/v1/admin/routes/{route}/pilot/promote")
    async def pilot_promote(route: str, body: RollbackBody, who: KeyRecord = Depends(key)) -> dict[str, Any]:  # noqa: B008
        return (await _run(lambda: pilots.promote(who, route, reason=body.reason))).to_json()

    @app.get("/v1/admin/routes/{route}/pilots")
    async def pilot_list(route: str, who: KeyRecord = Depends(reader)) -> dict[str, Any]:  # noqa: B008
        return {"object": "list", "data": await _run(lambda: pilots.list(who, route))}

    @app.get("/v1/admin/routes/{route}/pilot/report")
    async def pilot_report(route: str, request: Request, who: KeyRecord = Depends(reader)) -> dict[str, Any]:  # noqa: B008
        raw = request.query_params.get("pilot")
        if raw is not None and not raw.isdigit():
            raise APIError(400, "pilot is a pilot's number (GET …/pilots lists them)", code="invalid_request")
        return await _run(lambda: pilots.report(who, route, int(raw) if raw else None))

    @app.get("/v1/admin/monitor/{name}")
    async def monitor(name: str, request: Request, who: KeyRecord = Depends(reader)) -> dict[str, Any]:  # noqa: B008
        """A route's or adapter's monitoring summary: ``since`` and ``bucket`` in seconds."""
        try:
            since = float(request.query_params.get("since", 86_400))
            bucket = float(request.query_params.get("bucket", 3_600))
        except ValueError as e:
            raise APIError(400, "since and bucket are seconds", code="invalid_request") from e
        return await _run(lambda: summary(release.registry, who, name, since_s=since, bucket_s=bucket))

    @app.get("/v1/admin/adapters/{adapter}/report")
    async def documents(adapter: str, request: Request, who: KeyRecord = Depends(reader)) -> Response:  # noqa: B008
        """The model card or compliance report (``document``), as HTML or JSON (``format``)."""
        kind = request.query_params.get("document", "compliance")
        shape = request.query_params.get("format", "html")
        if kind not in ("model_card", "compliance") or shape not in ("html", "json"):
            raise APIError(400, "document is model_card or compliance; format is html or json", code="invalid_request")

        def build() -> dict[str, Any]:
            try:
                facts = gather(release.registry, adapter, audit=release.audit, who=who, witness=witness())
            except ConfigError as e:
                raise ReleaseError(f"no adapter {adapter!r} for this key", status=404, code="adapter_not_found") from e
            return model_card(facts) if kind == "model_card" else compliance_report(facts)

        document = await _run(build)
        if shape == "json":
            return JSONResponse(document)
        return HTMLResponse(render(kind, document))

    def witness() -> dict[str, Any] | None:
        audit = release.audit
        return RegistryWitness(release.registry, audit.path).head() if audit is not None else None

    @app.put("/v1/admin/release-policy")
    async def policy(body: PolicyBody, who: KeyRecord = Depends(key)) -> dict[str, Any]:  # noqa: B008
        count = await _run(lambda: release.set_policy(who, body.tenant, body.approvals_required))
        return {"tenant": body.tenant, "approvals_required": count}
