"""Assemble a server from a config and a home directory, and run it with uvicorn."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from fastapi import FastAPI

from loraforge.data.licensing import load_policy
from loraforge.errors import ConfigError
from loraforge.files import private_directory
from loraforge.govern.audit_witness import audit_log
from loraforge.govern.deploy import Deployments
from loraforge.govern.release import Release
from loraforge.govern.review import Reviews
from loraforge.home import model_cache_dir
from loraforge.jobs.files import Declaration, FileService
from loraforge.jobs.service import JobService
from loraforge.models.precision import resolve_precision
from loraforge.models.sources import BaseModel, load_model, load_tokenizer, resolve_base_model
from loraforge.serve.adapter_cache import AdapterCache
from loraforge.serve.adapters import AdapterStore
from loraforge.serve.app import create_app
from loraforge.serve.config import ServeConfig
from loraforge.serve.engine import LocalEngine
from loraforge.serve.forward import LlamaRunner
from loraforge.serve.guarding import InputGuard
from loraforge.serve.home_registry import home_registry
from loraforge.serve.keys import KeyStore
from loraforge.serve.limits import Limits, RateLimiter
from loraforge.serve.prefix_cache import PrefixCache
from loraforge.serve.service import InferenceService
from loraforge.serve.telemetry import Metrics
from loraforge.serve.usage import UsageLedger

T = TypeVar("T")
SWITCH_INTERVAL_S = 0.0005
EXIT_ENGINE_DIED = 70  # EX_SOFTWARE: the engine thread stopped on an error
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>", "<|end|>")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("loraforge", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level)
        logger.propagate = False


@dataclass
class Server:
    app: FastAPI
    engine: LocalEngine
    base: BaseModel


def build_server(
    config: ServeConfig, home: Path, *, on_engine_death: Callable[[BaseException], None] | None = None
) -> Server:
    """Load the base model, start the engine and build the app (the engine thread is running).

    Args:
        on_engine_death: called if the engine thread stops on an error (``run_server`` exits then).
    """
    private_directory(home)  # keys' hashes, usage, adapters and the audit log: this user's only
    # the registry first: a schema behind the code (with upgrade_registry off) stops the start at once;
    # a file-based home is imported on first start
    registry = home_registry(home, config.database_url, upgrade_schema=config.upgrade_registry)
    if config.licence_policy:
        load_policy(config.licence_policy)  # a malformed policy stops the start, not an upload
    if config.threads:
        torch.set_num_threads(config.threads)
    # Resolving may dequantize a packaged model (tensor work) the first time: in a thread that
    # ends, so that its OpenMP pool goes with it (see engine.py).
    base = _in_passing_thread(lambda: resolve_base_model(config.base_model, model_cache_dir(home)))
    tokenizer = load_tokenizer(base)

    def build_runner() -> LlamaRunner:  # on the engine's thread, like all tensor work
        dtype = resolve_precision(config.precision, torch.device("cpu"))
        model = load_model(base, dtype=dtype)
        model.eval()  # type: ignore[no-untyped-call]
        return LlamaRunner(
            model, max_slots=config.max_batch_size, weight_format=config.weight_format, lora_kernel=config.lora_kernel
        )

    metrics = Metrics()
    stop_tokens = {tokenizer.eos_token_id} | {
        tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN if t in tokenizer.get_vocab()
    }
    engine = LocalEngine(
        build_runner,
        tokenizer,
        # A local model directory is served under its directory name, not its full path.
        model_id=base.model_id,
        max_queue_wait_s=config.max_queue_wait_s,
        stop_tokens=[int(t) for t in stop_tokens if isinstance(t, int)],
        observer=metrics,
        prefix_cache=PrefixCache(config.prefix_cache_mb * 2**20) if config.prefix_cache_mb else None,
        max_queued_per_tenant=config.max_queued_per_tenant,
        max_prefill_tokens=config.max_prefill_tokens,
        tenant_slowdown=config.tenant_slowdown,
        on_death=on_engine_death,
    )
    if config.max_context_tokens:
        engine.context_length = min(engine.context_length, config.max_context_tokens)
    positions = engine.runner.limit_kv_pool(config.kv_cache_mb * 2**20)
    if positions < min(engine.context_length, 256):
        engine.close()
        raise ConfigError(
            f"kv_cache_mb {config.kv_cache_mb} holds only {positions} positions for each of the "
            f"{config.max_batch_size} batch slots; raise kv_cache_mb or lower max_batch_size"
        )
    # fine-tuning jobs' models (ft:…) are served from the registry beside the adapters registered by hand
    store = AdapterStore(
        home, reserved_names={base.model_id, base.name}, max_rank=config.max_lora_rank, registry=registry
    )
    cache = AdapterCache(
        store,
        engine.runner,
        base_sha256=base.sha256,
        capacity=config.max_loaded_adapters,
        per_tenant=config.max_loaded_adapters_per_tenant,
        max_rank=config.max_lora_rank,
        run=engine.call,
    )
    limits = Limits(
        config.requests_per_minute,
        config.tokens_per_minute,
        config.max_concurrent_requests,
        config.adapter_loads_per_minute,
    )
    audit = audit_log(home, registry)
    reviews = Reviews(registry, audit)
    guard = None
    if config.guard_policy:
        guard = InputGuard(Path(config.guard_policy), audit=audit, metrics=metrics, run=engine.call, reviews=reviews)
        guard.start()
    service = InferenceService(
        engine,
        store=store,
        cache=cache,
        limiter=RateLimiter(limits),
        usage=UsageLedger(
            home,
            price_prompt_1k=config.price_per_1k_prompt_tokens,
            price_completion_1k=config.price_per_1k_completion_tokens,
            registry=registry,
        ),
        metrics=metrics,
        default_max_tokens=config.default_max_tokens,
        request_timeout_s=config.request_timeout_s,
        created=int(time.time()),
        max_echo_tokens=config.max_echo_tokens,
        monitor_window=config.monitor_window,
        guard=guard,
    )
    files = FileService(
        registry,
        home / "files",
        max_bytes=config.max_upload_bytes,
        tokenizer=tokenizer,
        policy=Path(config.licence_policy) if config.licence_policy else None,
        default_declarations={
            tenant: Declaration(str(d["license"]), str(d["owner"]), bool(d["personal_data"]))
            for tenant, d in config.default_declarations.items()
        },
    )
    jobs = JobService(
        registry, files, base_models={base.model_id: base.sha256}, base_sources={base.model_id: config.base_model}
    )
    app = create_app(
        config,
        service,
        keys=KeyStore(home, registry),
        store=store,
        cache=cache,
        audit=audit,
        release=Release(registry, audit),
        deployments=Deployments(registry, audit, reserved=set(store.reserved_names) | {base.model_id}),
        metrics=metrics,
        reviews=reviews,
        files=files,
        jobs=jobs,
    )
    app.router.on_shutdown.append(engine.close)
    app.router.on_shutdown.append(registry.close)
    return Server(app, engine, base)


def _in_passing_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a thread of its own that ends when it returns."""
    result: Future[T] = Future()

    def target() -> None:
        try:
            result.set_result(fn())
        except BaseException as e:  # raised in the caller
            result.set_exception(e)

    thread = threading.Thread(target=target, name="loraforge-resolve")
    thread.start()
    thread.join()
    return result.result()


def run_server(config: ServeConfig, home: Path) -> None:
    """Serve until interrupted."""
    import uvicorn

    from loraforge.runtime import configure_process

    configure_process()

    configure_logging()
    # The engine thread gives the GIL up around every tensor operation and must get it back at
    # once: with the default 5 ms switch interval, a busy event loop (parsing bodies, writing long
    # logprobs responses) could hold it that long each time and slow every decode step many times over.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    log = logging.getLogger("loraforge.serve")
    stopping: list[Any] = []  # the uvicorn server, once it exists

    def engine_died(error: BaseException) -> None:
        for uv_server in stopping:
            uv_server.should_exit = True

    server = build_server(config, home, on_engine_death=engine_died)
    log.info(
        "serving",
        extra={
            "fields": {
                "model": server.base.name,
                "base_sha256": server.base.sha256,
                "precision": str(server.engine.runner.dtype).removeprefix("torch."),
                "weight_format": server.engine.runner.weight_format,
                "lora_kernel": "native" if server.engine.runner.kernel is not None else "torch",
                "max_batch_size": config.max_batch_size,
                "home": str(home),
                "url": f"http://{config.host}:{config.port}/v1",
            }
        },
    )
    uv = uvicorn.Server(
        uvicorn.Config(server.app, host=config.host, port=config.port, log_config=None, access_log=False)
    )
    stopping.append(uv)
    if server.engine.died is not None:  # it died while the server was being built
        raise SystemExit(EXIT_ENGINE_DIED)
    uv.run()
    if server.engine.died is not None:
        # Requests were answered 503 from the moment it died; a supervisor restarts the process.
        log.critical("exiting: the inference engine stopped on an error")
        raise SystemExit(EXIT_ENGINE_DIED)
