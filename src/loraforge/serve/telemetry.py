"""Prometheus metrics of one server (its own registry: no global state between app instances)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "loraforge_requests", "Requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.errors = Counter("loraforge_errors", "Error responses by error code", ["code"], registry=r)
        self.latency = Histogram(
            "loraforge_request_latency_seconds", "Request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "loraforge_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter(
            "loraforge_prompt_tokens", "Prompt tokens by tenant and model", ["tenant", "model"], registry=r
        )
        self.completion_tokens = Counter(
            "loraforge_completion_tokens", "Generated tokens by tenant and model", ["tenant", "model"], registry=r
        )
        self.decode_rate = Gauge(
            "loraforge_generated_tokens_per_second", "Generated tokens per second in the last decode step", registry=r
        )
        self.queue_depth = Gauge("loraforge_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.batch_size = Gauge("loraforge_batch_size", "Rows in the running batch", registry=r)
        self.batch_sizes = Histogram(
            "loraforge_batch_size_per_step", "Rows per decode step", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.loaded_adapters = Gauge("loraforge_loaded_adapters", "Adapters held in memory", registry=r)
        self.preemptions = Gauge(
            "loraforge_preemptions",
            "Rows taken out of the batch (since start) so that a tenant below its fair share got a slot",
            registry=r,
        )
        self.prefix_cache_bytes = Gauge(
            "loraforge_prefix_cache_bytes", "Bytes of cached prompt-prefix keys and values", registry=r
        )
        self.prefix_cache_hit_ratio = Gauge(
            "loraforge_prefix_cache_hit_ratio",
            "Share of prompt tokens (of requests that may use the cache) not prefilled again, since start",
            registry=r,
        )

    def step(self, batch_size: int, queue_depth: int, seconds: float) -> None:
        """Engine observer: called after every decode step (from the engine thread)."""
        self.batch_size.set(batch_size)
        self.queue_depth.set(queue_depth)
        self.batch_sizes.observe(batch_size)
        if seconds > 0:
            self.decode_rate.set(batch_size / seconds)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
