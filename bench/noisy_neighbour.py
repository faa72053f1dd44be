"""A noisy neighbour: one tenant floods the server with its worst requests while another streams.

The quiet tenant streams chat completions one after another (greedy, a fixed number of tokens),
first alone (the baseline, in the same run), then while the noisy tenant's clients send, without
pause, every kind of request that used to degrade the service for others:

- completions with 3,000 one-token prompts, and with as many prompts as the batch holds, scoring
  only (``max_tokens`` 0);
- chats with four stop strings of 256 characters, a temperature of 1e-300, a seed of 2^64, the
  largest seed with four choices, and echo-with-logprobs over a 900-token prompt;
- chats that cycle through more adapters than the adapter cache holds.

It reports the quiet tenant's latency (whole stream) and time to first token, p50 and p99, quiet
and flooded, their ratio (target: p99 within 2× of the quiet run), the noisy tenant's answers by
status, and the engine's preemptions. Every figure comes from the same run on the same machine.

    python bench/noisy_neighbour.py [--victim-requests 20] [--noisy-clients 6] [--tenant-slowdown 100]

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

VICTIM_TOKENS = 32


def noisy_requests(base_model: str, adapters: list[str], batch: int) -> list[tuple[str, dict[str, Any]]]:
    """The noisy tenant's worst requests, as (path, body), sent round-robin."""
    long_stop = ["\u2603" + "x" * 255, "y" * 256, "zz" * 128, "#" * 256]
    chat = [{"role": "user", "content": "Tell me a very long story about the sea."}]

    def ask(**extra: Any) -> tuple[str, dict[str, Any]]:
        return "/v1/chat/completions", {"model": base_model, "messages": chat, "max_tokens": 16, **extra}

    requests: list[tuple[str, dict[str, Any]]] = [
        ("/v1/completions", {"model": base_model, "prompt": [[1]] * 3000, "max_tokens": 0}),  # refused: too many
        ("/v1/completions", {"model": base_model, "prompt": [[1, 2, 3]] * batch, "max_tokens": 0}),  # scoring only
        ask(stop=long_stop),
        ask(temperature=1e-300),
        ask(seed=2**64),  # refused: out of range
        ask(seed=2**63 - 1, n=4, temperature=1.0),
        (
            "/v1/completions",
            {"model": base_model, "prompt": "word " * 900, "max_tokens": 0, "echo": True, "logprobs": 5},
        ),
    ]
    for name in adapters:  # cycling through more adapters than the cache holds
        requests.append(("/v1/chat/completions", {"model": name, "messages": chat, "max_tokens": 16}))
    return requests


def flood(
    url: str, key: str, requests: list[tuple[str, dict[str, Any]]], stop: threading.Event, seen: Counter[int]
) -> None:
    """Send ``requests`` round-robin until ``stop`` is set; count the answers by status."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(timeout=600) as client:
        i = 0
        while not stop.is_set():
            path, body = requests[i % len(requests)]
            i += 1
            try:
                status = client.post(url + path, json=body, headers=headers).status_code
            except httpx.HTTPError:
                status = 0  # a transport error: counted apart
            seen[status] += 1
            if status == 429:
                time.sleep(0.05)


def victim_stream(url: str, key: str, model: str, tokens: int = VICTIM_TOKENS) -> tuple[float, float, str]:
    """One streamed greedy chat: (seconds to the last token, seconds to the first, its text)."""
    import httpx

    body = {
        "model": model,
        "messages": [{"role": "user", "content": "What are your opening hours on Sunday?"}],
        "max_tokens": tokens,
        "min_tokens": tokens,
        "temperature": 0,
        "stream": True,
    }
    started = time.perf_counter()
    first = None
    text = ""
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=600
    ) as response:
        if response.status_code != 200:
            raise RuntimeError(f"the quiet tenant got {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"the quiet tenant's stream failed: {chunk['error']}")
            delta = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if delta:
                first = first or time.perf_counter()
                text += delta
    return time.perf_counter() - started, (first or time.perf_counter()) - started, text


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_scenario(
    url: str,
    victim_key: str,
    noisy_key: str,
    requests: list[tuple[str, dict[str, Any]]],
    *,
    model: str,
    victim_requests: int,
    noisy_clients: int,
    tokens: int = VICTIM_TOKENS,
    during: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """The quiet tenant alone, then beside the flood; the figures of both."""
    quiet = [victim_stream(url, victim_key, model, tokens) for _ in range(victim_requests)]
    stop, seen = threading.Event(), Counter[int]()
    clients = [
        threading.Thread(target=flood, args=(url, noisy_key, requests, stop, seen)) for _ in range(noisy_clients)
    ]
    for client in clients:
        client.start()
    try:
        time.sleep(1.0)  # the flood is under way
        loud = [victim_stream(url, victim_key, model, tokens) for _ in range(victim_requests)]
        if during is not None:
            during()
    finally:
        stop.set()
        for client in clients:
            client.join()
    figures: dict[str, Any] = {"noisy_statuses": dict(sorted(seen.items()))}
    for label, runs in (("quiet", quiet), ("flooded", loud)):
        latency, ttft = [r[0] for r in runs], [r[1] for r in runs]
        figures[label] = {
            "p50_s": round(statistics.median(latency), 3),
            "p99_s": round(percentile(latency, 0.99), 3),
            "ttft_p50_s": round(statistics.median(ttft), 3),
            "ttft_p99_s": round(percentile(ttft, 0.99), 3),
        }
    figures["p99_ratio"] = round(figures["flooded"]["p99_s"] / figures["quiet"]["p99_s"], 2)
    figures["texts_equal"] = len({r[2] for r in quiet + loud}) == 1
    return figures


def cpu_features() -> str:
    flags: set[str] = set()
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = [("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_tile", "AMX")]
    return f"{model}; " + ", ".join(label for flag, label in wanted if flag in flags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--victim-requests", type=int, default=20)
    parser.add_argument("--noisy-clients", type=int, default=6)
    parser.add_argument("--adapters", type=int, default=10, help="adapters the noisy tenant cycles through")
    parser.add_argument("--max-prefill-tokens", type=int, default=None, help="the server setting (default: its own)")
    parser.add_argument(
        "--tenant-slowdown", type=float, default=None, help="the server setting (default: its own; 100: no pacing)"
    )
    args = parser.parse_args()

    import httpx

    from loraforge.serve.adapters import AdapterStore
    from loraforge.serve.keys import KeyStore
    from serve_throughput import launch, make_adapters  # beside this script

    print(f"CPU: {cpu_features()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        dirs, base = make_adapters(Path(tmp) / "adapters")
        store = AdapterStore(home)
        names = []
        for i in range(args.adapters):
            names.append(f"noisy{i}")
            store.add(dirs[i % len(dirs)], names[-1], tenant="noisy")
        victim_key = KeyStore(home).create("quiet")[0]
        noisy_key = KeyStore(home).create("noisy")[0]
        admin_key = KeyStore(home).create("ops", "admin", all_tenants=True)[0]
        settings = "max_loaded_adapters: 4\n"
        if args.max_prefill_tokens:
            settings += f"max_prefill_tokens: {args.max_prefill_tokens}\n"
        if args.tenant_slowdown:
            settings += f"tenant_slowdown: {args.tenant_slowdown}\n"
        # The server in a process of its own, as in production: the clients' Python does not share its GIL.
        server, url = launch(home, settings)
        try:
            model = base.model_id
            figures = run_scenario(
                url,
                victim_key,
                noisy_key,
                noisy_requests(model, names, 16),
                model=model,
                victim_requests=args.victim_requests,
                noisy_clients=args.noisy_clients,
            )
            metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {admin_key}"}, timeout=10).text
            figures["preemptions"] = next(
                int(float(line.split()[-1]))
                for line in metrics.splitlines()
                if line.startswith("loraforge_preemptions ")
            )
        finally:
            server.terminate()
            server.wait(timeout=30)
        figures["max_prefill_tokens"] = args.max_prefill_tokens or "default"
        figures["tenant_slowdown"] = args.tenant_slowdown or "default"
        figures["cpu"] = cpu_features()
    q, f = figures["quiet"], figures["flooded"]
    print(f"{'':22}{'quiet':>10}{'flooded':>10}")
    for key in ("p50_s", "p99_s", "ttft_p50_s", "ttft_p99_s"):
        print(f"{key:22}{q[key]:>10.3f}{f[key]:>10.3f}")
    print(f"p99 ratio: {figures['p99_ratio']}× (target ≤ 2×: {'met' if figures['p99_ratio'] <= 2 else 'MISSED'})")
    print(f"noisy tenant's answers by status: {figures['noisy_statuses']}; preemptions: {figures['preemptions']}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
