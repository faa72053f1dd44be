"""Prometheus metrics of one server (its own registry: no global state between app instances)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest

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

        # -- per model (the name called: a route, an adapter or the base) and adapter (what answered) --
        self.model_requests = Counter(
            "loraforge_model_requests",
            "Finished requests by model called, adapter that answered (base: the base model) and status",
            ["model", "adapter", "status"],
            registry=r,
        )
        self.model_latency = Histogram(
            "loraforge_model_latency_seconds",
            "Latency of finished requests by model called and adapter",
            ["model", "adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cost = Counter("loraforge_cost", "Metered cost by tenant and model", ["tenant", "model"], registry=r)
        self.answers = Counter("loraforge_answers", "Answers judged for refusals, by adapter", ["adapter"], registry=r)
        self.refusals = Counter("loraforge_refusals", "Answers that refused, by adapter", ["adapter"], registry=r)
        self.feedback = Summary(
            "loraforge_feedback_score",
            "End users' ratings on 0..1 (thumbs: 0 or 1; stars: (r-1)/4), by model called and adapter",
            ["model", "adapter"],
            registry=r,
        )
        self.guard_events = Counter(
            "loraforge_guard_events",
            "Requests a guard check flagged or blocked, by check, action, tenant and model",
            ["check", "action", "tenant", "model"],
            registry=r,
        )
        self.pilot_requests = Counter(
            "loraforge_pilot_requests", "Requests of a route's pilot by arm", ["route", "arm"], registry=r
        )
        self.unfamiliar_share = Gauge(
            "loraforge_input_unfamiliar_share",
            "Share of unfamiliar prompts (unlike the adapter's training prompts) in its latest window",
            ["adapter"],
            registry=r,
        )
        self.drift_threshold = Gauge(
            "loraforge_input_drift_threshold",
            "Unfamiliar share above which a full window raises the input drift alert",
            ["adapter"],
            registry=r,
        )
        self.drift_alert = Gauge(
            "loraforge_input_drift_alert", "1 while an adapter's latest full window drifts", ["adapter"], registry=r
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
