"""The server's configuration: one dataclass, read once from ``--config YAML`` and the flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.configfile import read_config_file
from loraforge.errors import ConfigError
from loraforge.models.precision import PRECISIONS
from loraforge.models.sources import DEFAULT_BASE_MODEL
from loraforge.serve.lora_batching import LORA_KERNELS
from loraforge.serve.weights import WEIGHT_FORMATS


@dataclass
class ServeConfig:
    """Every server setting and its default. Limits apply per API key."""

    base_model: str = DEFAULT_BASE_MODEL
    """The base model served (a packaged model name or a local Hugging Face directory)."""
    host: str = "127.0.0.1"
    """Interface to listen on."""
    port: int = 8000
    """Port."""
    max_batch_size: int = 16
    """Rows decoded together in one step (each choice of each request is a row)."""
    max_queue_wait_s: float = 60.0
    """A request that gets no batch slot within this time is answered 503 with Retry-After."""
    max_loaded_adapters: int = 8
    """Adapters kept in memory; the least recently used is dropped first."""
    requests_per_minute: int = 600
    """Requests one API key may make per minute."""
    tokens_per_minute: int = 200_000
    """Prompt tokens plus max_tokens, reserved when a request starts; unused tokens are returned."""
    max_concurrent_requests: int = 16
    """Requests one API key may have running at once."""
    max_body_bytes: int = 1_000_000
    """Largest request body in bytes; a larger one is answered 413."""
    max_upload_bytes: int = 67_108_864  # 64 MiB
    """Largest file uploaded to /v1/files, in bytes; streamed to disk, a larger one is answered 413."""
    licence_policy: str | None = None
    """The licence policy uploads are checked against (YAML; default: loraforge's shipped policy)."""
    default_declarations: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per tenant, the licence declaration of an upload that sends none: ``{tenant: {license: SPDX id,
    owner: NAME, personal_data: true|false}}``. A tenant without one must declare each upload."""
    upgrade_registry: bool = True
    """Bring the registry's schema to this version on start; off (``--no-upgrade``), a registry behind
    the code stops the start with the command that upgrades it (for upgrades done by an operator)."""
    database_url: str | None = None
    """The registry database: sqlite:///PATH or postgresql://USER@HOST/DB (default: $LORAFORGE_DATABASE_URL,
    else HOME/registry.db)."""
    request_timeout_s: float = 300.0
    """A request not finished after this many seconds is answered 408 (timeout)."""
    max_context_tokens: int | None = 4096
    """Longest prompt + completion (null: the model's own context; the smaller of the two applies).
    The KV pool grows to at most max_batch_size × this many positions (about 46 KB each on the
    default model), and never past kv_cache_mb."""
    kv_cache_mb: int = 4096
    """Memory the KV pool may take. A request that would need more positions than fit is answered
    503 (kv_budget_exceeded) instead of growing the pool until the process is killed."""
    max_prefill_tokens: int = 512
    """The most prompt tokens prefilled between two decode steps while requests are decoding; within
    it, the engine takes as many as cost about one decode step (measured as it runs), so that long
    prompts (or a flood of them) slow the running streams by at most about half. With nothing
    decoding, a prompt is prefilled in one piece."""
    tenant_slowdown: float = 1.5
    """How many times more slowly one tenant's streams may run because another tenant, which has
    used more of the engine lately, shares the machine: that tenant's rows' part of each step and
    its prefills between steps are paced to keep within it (never below a fifth of a step, so that
    it still moves on). Higher: heavy tenants get more of the machine, light ones wait longer."""
    guard_policy: str | None = None
    """A YAML guard policy (docs/guardrails.md): which checks run on requests' messages, per tenant,
    and whether a hit blocks (400), is flagged or is allowed. None: no guard runs."""
    max_queued_per_tenant: int | None = None
    """Requests of one tenant waiting for a batch slot at once; more get 429 (default: 4 × max_batch_size)."""
    max_echo_tokens: int = 1024
    """Longest prompt that a completion with echo and logprobs scores (its logits cost vocab × 4 bytes a token)."""
    max_lora_rank: int = 64
    """Highest LoRA rank an adapter may have to be loaded."""
    adapter_loads_per_minute: int = 30
    """Adapters one key may have loaded from disk per minute (requests to loaded adapters do not count)."""
    max_loaded_adapters_per_tenant: int | None = None
    """Places of the adapter cache one tenant may hold (default: half of max_loaded_adapters); a tenant
    at its quota replaces its own adapters, not other tenants'."""
    default_max_tokens: int = 512
    """Chat completions without max_tokens generate up to this many tokens (or to the context end)."""
    price_per_1k_prompt_tokens: float = 0.0
    """Price of 1000 prompt tokens, for the usage report."""
    price_per_1k_completion_tokens: float = 0.0
    """Price of 1000 completion tokens, for the usage report."""
    admin_endpoints: bool = False
    """Hot loading and unloading of adapters over HTTP (admin keys only). Off unless switched on."""
    public_metrics: bool = False
    """Serve /metrics without an admin key (it names tenants and adapters)."""
    precision: str = "auto"
    """How the base weights are stored: bf16 where bf16 matmuls are fast (AMX, AVX512-BF16, CUDA),
    else fp32 ("auto"); or "bf16" / "fp32" explicitly. Adapters and activations run in this precision."""
    weight_format: str = "auto"
    """How the engine holds fp32 base weights: "gguf" (the Q4_1 / Q8_0 blocks of a model loaded from a
    GGUF file, exactly its values, 5-8.5 bits per weight; needs the native kernels), "fp16" (half the
    bytes per decoded token, multiplied in fp32), "onednn" (fp32 in oneDNN's blocked layout) or
    "row-major"; "auto" takes the first that works here and for these weights. bf16 weights are always
    row-major."""
    lora_kernel: str = "auto"
    """How decode steps apply adapters: "native" (one compiled call per projection for every adapter
    of the step, adapter weights in fp16; built on first use with g++), "torch" (batched PyTorch
    products, fp32), or "auto" (native where it builds, for fp32 models)."""
    prefix_cache_mb: int = 256
    """Memory for the keys and values of prompt prefixes seen before (0 = off). A request that starts
    like an earlier one of the same tenant and adapter (a shared system prompt) skips their prefill."""
    monitor_window: int = 50
    """Prompts per adapter in the input drift window: the share of them unlike the adapter's training
    prompts is watched, and a full window above 5% plus three standard deviations raises the alert
    (docs/monitoring.md)."""
    threads: int | None = None
    """PyTorch threads for the engine (default: PyTorch's choice, one per core)."""

    def __post_init__(self) -> None:
        problems = []
        positive = (
            "port",
            "max_batch_size",
            "max_loaded_adapters",
            "requests_per_minute",
            "tokens_per_minute",
            "max_concurrent_requests",
            "max_body_bytes",
            "default_max_tokens",
            "kv_cache_mb",
            "max_prefill_tokens",
            "max_echo_tokens",
            "max_lora_rank",
            "adapter_loads_per_minute",
            "monitor_window",
        )
        for name in positive:
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_queue_wait_s", "request_timeout_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("price_per_1k_prompt_tokens", "price_per_1k_completion_tokens"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lora_kernel not in LORA_KERNELS:
            problems.append(f"lora_kernel must be one of {', '.join(LORA_KERNELS)}, got {self.lora_kernel!r}")
        if not 1 < self.tenant_slowdown <= 100:
            problems.append(f"tenant_slowdown must be > 1 and <= 100, got {self.tenant_slowdown}")
        if self.prefix_cache_mb < 0:
            problems.append(f"prefix_cache_mb must be >= 0, got {self.prefix_cache_mb}")
        for name in ("max_queued_per_tenant", "max_loaded_adapters_per_tenant"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (or null for the default), got {getattr(self, name)}")
        if self.max_context_tokens is not None and self.max_context_tokens < 2:
            problems.append(f"max_context_tokens must be >= 2, got {self.max_context_tokens}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.weight_format not in WEIGHT_FORMATS:
            problems.append(f"weight_format must be one of {', '.join(WEIGHT_FORMATS)}, got {self.weight_format!r}")
        if self.port > 65535:
            problems.append(f"port must be <= 65535, got {self.port}")
        problems += declaration_problems(self.default_declarations)
        if self.guard_policy and not Path(self.guard_policy).is_file():
            problems.append(f"guard_policy {self.guard_policy} is not a file")
        if self.licence_policy and not Path(self.licence_policy).is_file():
            problems.append(f"licence_policy {self.licence_policy} is not a file")
        if problems:
            raise ConfigError("invalid server config: " + "; ".join(problems))


def load_serve_config(path: str | Path | None, overrides: dict[str, Any]) -> ServeConfig:
    """The config from a YAML file (optional) with flag overrides (``None`` values are ignored)."""
    values = read_config_file(path, ServeConfig) if path is not None else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ServeConfig(**values)


def declaration_problems(declarations: Any) -> list[str]:
    """What is wrong with ``default_declarations`` (nothing: [])."""
    if not isinstance(declarations, dict):
        return [f"default_declarations must map tenants to declarations, got {type(declarations).__name__}"]
    problems = []
    for tenant, d in declarations.items():
        where = f"default_declarations.{tenant}"
        if not isinstance(d, dict):
            problems.append(f"{where} must be a mapping with license, owner and personal_data")
            continue
        unknown = sorted(set(d) - {"license", "owner", "personal_data"})
        if unknown:
            problems.append(f"{where} has unknown key(s) {', '.join(unknown)}")
        for key in ("license", "owner"):
            if not isinstance(d.get(key), str) or not d[key].strip():
                problems.append(f"{where}.{key} must be a non-empty string")
        if not isinstance(d.get("personal_data"), bool):
            problems.append(f"{where}.personal_data must be true or false")
    return problems
