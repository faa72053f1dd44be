"""Which models a caller may use: the base model, routes, and the adapters its tenant may see, in memory.

A route (``govern.deploy``) is resolved on every request, so a deployment or rollback takes effect
at the next request, without a restart; a request already admitted keeps the adapter it resolved.
A production key reaches deployed routes only; a development key also the base model and its
tenant's (and public) adapters in any state but retired. Another tenant's adapter or route answers
as a missing one (no existence leak); an adapter is loaded (and verified) on its first use, within
the key's adapter loads per minute.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from loraforge.errors import ModelError
from loraforge.govern.deploy import Binding, bindings, resolve
from loraforge.serve.adapter_cache import AdapterCache, LoadedAdapter
from loraforge.serve.adapters import AdapterStore, Registration
from loraforge.serve.api_errors import APIError, engine_unavailable, not_found, public_message
from loraforge.serve.generation import Engine, EngineUnavailable
from loraforge.serve.keys import KeyRecord
from loraforge.serve.limits import LimitExceeded, RateLimiter
from loraforge.serve.protocol import ModelCard

log = logging.getLogger("loraforge.serve")


@dataclass(frozen=True)
class Target:
    """What a request's model name resolved to: the adapter (None: the base model), and when the
    name was a route, the route and the pilot arm that took the request."""

    registration: Registration | None
    route: str | None = None
    pilot: int | None = None
    arm: str | None = None


def serves(binding: Binding, reg: Registration, key: KeyRecord) -> bool:
    """Whether the route ``binding`` may answer ``key`` with ``reg``: a servable adapter the key's
    tenant may see, of the route's own owner."""
    return reg.servable and reg.visible_to(key.tenant) and binding.tenant == reg.tenant


class ModelCatalog:
    """The models of one server: ``engine``'s base model and the adapters of ``store``.

    Args:
        cache: where adapters are loaded into memory (``None``: the base model alone is served).
        created: the server's start (Unix seconds), the base model's ``created``.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        store: AdapterStore,
        cache: AdapterCache | None,
        limiter: RateLimiter,
        created: int,
    ) -> None:
        self.engine = engine
        self.store = store
        self.cache = cache
        self.limiter = limiter
        self.created = created

    def models(self, key: KeyRecord) -> list[ModelCard]:
        base = self.engine.model_id
        production = key.environment == "production"
        cards = [] if production else [ModelCard(id=base, created=self.created, owned_by="loraforge", root=base)]
        admin = key.role == "admin"
        regs = {reg.name: reg for reg in self.store.registrations()}
        for binding in bindings(self.store.registry):
            reg = regs.get(binding.adapter)
            if reg is not None and serves(binding, reg, key):
                cards.append(
                    ModelCard(
                        id=binding.route,
                        created=int(reg.added_at),
                        owned_by="public" if reg.public else reg.tenant or "",
                        parent=base,
                        root=base,
                        adapter=reg.name if admin else None,
                        release_override=reg.release_override,
                    )
                )
        if production:
            return cards
        for reg in regs.values():
            if reg.servable and reg.visible_to(key.tenant):
                cards.append(
                    ModelCard(
                        id=reg.name,
                        created=int(reg.added_at),
                        owned_by="public" if reg.public else reg.tenant or "",
                        parent=base,
                        root=base,
                        governance_flags=list(reg.governance_flags) if admin else None,
                        governance_override=reg.governance_override if admin else None,
                        state=reg.state if admin else None,
                        release_override=reg.release_override,
                    )
                )
        return cards

    def model(self, key: KeyRecord, name: str) -> ModelCard:
        for card in self.models(key):
            if card.id == name:
                return card
        raise not_found(name)

    def registration(self, key: KeyRecord, model: str) -> Registration | None:
        """The adapter registration the caller may use under the name ``model`` (None = the base model)."""
        return self.target(key, model).registration

    def target(self, key: KeyRecord, model: str, user: str | None = None) -> Target:
        """What answers ``key`` under the name ``model``; on a route with a running pilot, the arm of
        the end user ``user`` (a pseudonym: the same user, the same arm) decides which adapter."""
        production = key.environment == "production"
        if model == self.engine.model_id and not production:
            return Target(None)
        binding = resolve(self.store.registry, model)
        if binding is not None:
            adapter, arm = binding.choose(user)
            reg = self.store.get(adapter)
            if reg is None or not serves(binding, reg, key):
                raise not_found(model)
            return Target(reg, binding.route, binding.pilot.id if binding.pilot else None, arm)
        reg = None if production else self.store.get(model)
        if reg is None or not reg.servable or not reg.visible_to(key.tenant):
            raise not_found(model)
        return Target(reg)

    async def resolve(self, key: KeyRecord, model: str) -> LoadedAdapter | None:
        """The adapter the caller may use under the name ``model`` (None = the base model), in memory."""
        reg = self.registration(key, model)
        return None if reg is None else await self.load(reg, key)

    async def load(self, reg: Registration, key: KeyRecord | None = None) -> LoadedAdapter:
        """The registered adapter in memory, loaded (and verified) on first use.

        A load from disk counts against ``key``'s adapter loads per minute; the place it takes in
        memory is charged to ``key``'s tenant.
        """
        if self.cache is None:
            raise not_found(reg.name)
        if key is not None and not self.cache.is_loaded(reg):
            try:
                self.limiter.load_adapter(key.id)
            except LimitExceeded as e:
                raise APIError(429, str(e), code="adapter_load_limit", retry_after=e.retry_after) from e
        tenant = key.tenant if key is not None else None
        try:
            return await asyncio.to_thread(self.cache.get, reg, tenant)
        except EngineUnavailable as e:
            raise engine_unavailable() from e
        except ModelError as e:
            log.warning("adapter %s cannot be served: %s", reg.name, e)
            raise APIError(
                400, f"The model '{reg.name}' cannot be served: {public_message(e)}", code="model_incompatible"
            ) from e
