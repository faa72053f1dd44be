"""Multi-adapter serving throughput: loraforge's server against PEFT, in the same run.

Load (non-streaming, like PEFT's batch which returns everything at the end):
16 concurrent requests spread over 4 adapters (r=16 on all projections, random weights on
the default model), 64 new tokens each, greedy, end of turn suppressed so every request makes
exactly 64 tokens (``min_new_tokens`` for PEFT, ``min_tokens`` for loraforge).

(a) sequential PEFT: ``set_adapter`` + ``generate`` per request;
(b) one PEFT mixed batch: ``generate(adapter_names=[...])`` over all 16 rows (left padding);
(c) loraforge: ``loraforge serve`` in its own process, 16 concurrent HTTP requests.
Adapter overhead: the same load through loraforge on the base model only against on adapters.
Single-request decode: ms per generated token at batch 1, (time for 129 tokens - time for 1) / 128,
loraforge over HTTP against HF ``generate``.
The mixed batch against the base batch, and loraforge with adapters against the base model, are
each measured twice, alternated, keeping the best of each: the shared machine's slow spells then
hit neither side of a ratio alone.
Latency: 64 concurrent streaming clients (32 tokens each): p50/p99 latency and time to first token.
Prefix cache: time to first token with a ~1,000-token system prompt, its first request against a
later one with the same system prompt (median over three system prompts).
The server runs with ``--weight-format`` (default ``auto``: for the default model, its own GGUF
blocks where the native kernels build); servers with fp16 weights and with float32 weights
(``onednn``) measure batch-1 decode again, for reference.

    python bench/serve_throughput.py [--weight-format auto|gguf|fp16|onednn|row-major]

The last line of output is one JSON object (speedup_vs_sequential, speedup_vs_mixed,
adapter_overhead, decode_ms_per_token, p99_latency_s, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ADAPTERS = 4
REQUESTS = 16
NEW_TOKENS = 64
REPEATS = 2  # the paired measurements are alternated this many times; the best of each is kept
PROMPTS = [
    "How do I reset my password?",
    "What are your opening hours on Sunday?",
    "Can I return a gift without a receipt?",
    "My parcel has not arrived yet. What should I do?",
    "Do you ship to Canada, and how long does it take?",
    "How can I change the delivery address of an order?",
    "Is there a student discount?",
    "Explain the warranty on headphones.",
]


def _cache() -> Path:
    from loraforge.home import model_cache_dir

    return model_cache_dir()


def _messages(i: int, system: str | None = None) -> list[dict[str, str]]:
    user = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
    return [{"role": "system", "content": system}, *user] if system else user


def _system_prompt(version: int) -> str:
    """A support policy of about 1,000 tokens; each version differs from its first words."""
    clauses = [
        f"Clause {n}: orders of category {n % 7} may be returned within {14 + n % 3 * 7} days if unused, "
        f"with the receipt; refunds go to the original payment method within {3 + n % 5} working days."
        for n in range(1, 31)
    ]
    return f"Support policy, version {version}. Answer from this policy only.\n" + "\n".join(clauses)


def make_adapters(root: Path) -> tuple[list[Path], Any]:
    """Four random r=16 adapters on the default model, each with a manifest (as training writes)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from loraforge.files import sha256_file
    from loraforge.models.sources import DEFAULT_BASE_MODEL, load_model, resolve_base_model

    base = resolve_base_model(DEFAULT_BASE_MODEL, _cache())
    dirs = []
    for i in range(ADAPTERS):
        torch.manual_seed(i)
        model = get_peft_model(load_model(base), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.01)
        out = root / f"adapter{i}"
        model.save_pretrained(out)
        manifest = {
            "base_model": base.to_json(),
            "checksums": {n: sha256_file(out / n) for n in ("adapter_config.json", "adapter_model.safetensors")},
        }
        (out / "manifest.json").write_text(json.dumps(manifest))
        dirs.append(out)
    return dirs, base


# -- PEFT baselines --------------------------------------------------------------------------------


def peft_baselines(dirs: list[Path], base: Any) -> dict[str, float]:
    import torch
    from peft import PeftModel

    from loraforge.data.templates import render
    from loraforge.models.sources import load_model, load_tokenizer

    tok = load_tokenizer(base)
    tok.padding_side = "left"
    model = PeftModel.from_pretrained(load_model(base), str(dirs[0]), adapter_name="adapter0")
    for i, d in enumerate(dirs[1:], 1):
        model.load_adapter(str(d), adapter_name=f"adapter{i}")
    model.eval()
    texts = [render(tok, _messages(i), generation_prompt=True) for i in range(REQUESTS)]
    names = [f"adapter{i % ADAPTERS}" for i in range(REQUESTS)]
    gen = {
        "max_new_tokens": NEW_TOKENS,
        "min_new_tokens": NEW_TOKENS,
        "do_sample": False,
        "pad_token_id": tok.pad_token_id,
    }
    out: dict[str, float] = {}
    with torch.inference_mode():
        enc = tok(texts[:1], return_tensors="pt", add_special_tokens=False)
        model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)  # warm-up
        started = time.perf_counter()
        for text, name in zip(texts, names, strict=True):
            model.set_adapter(name)
            enc = tok([text], return_tensors="pt", add_special_tokens=False)
            model.generate(**enc, **gen)
        out["sequential_tok_s"] = REQUESTS * NEW_TOKENS / (time.perf_counter() - started)
        print(f"(a) sequential PEFT: {out['sequential_tok_s']:.1f} tok/s", flush=True)

        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        mixed, plain = [], []
        for _ in range(REPEATS):  # alternated, best of each: the machine's noise hits both alike
            started = time.perf_counter()
            model.generate(**enc, **gen, adapter_names=names)
            mixed.append(REQUESTS * NEW_TOKENS / (time.perf_counter() - started))
            started = time.perf_counter()
            with model.disable_adapter():
                model.generate(**enc, **gen)
            plain.append(REQUESTS * NEW_TOKENS / (time.perf_counter() - started))
        out["mixed_tok_s"], out["hf_base_batch_tok_s"] = max(mixed), max(plain)
        print(f"(b) PEFT mixed batch: {out['mixed_tok_s']:.1f} tok/s", flush=True)
        print(f"    HF generate, same batch, base model only: {out['hf_base_batch_tok_s']:.1f} tok/s", flush=True)

        enc = tok(texts[:1], return_tensors="pt", add_special_tokens=False)
        with model.disable_adapter():

            def timed(tokens: int) -> float:
                t0 = time.perf_counter()
                model.generate(
                    **enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id
                )
                return time.perf_counter() - t0

            first = min(timed(1) for _ in range(3))
            total = min(timed(129) for _ in range(REPEATS))
        out["hf_decode_ms_per_token"] = (total - first) / 128 * 1000
        print(f"    HF generate batch 1: {out['hf_decode_ms_per_token']:.1f} ms/token", flush=True)
    return out


# -- loraforge through HTTP ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def served_format(home: Path) -> str:
    """The weight format the server chose, from its start-up log line."""
    for line in (home / "server.log").read_text(errors="replace").splitlines():
        if line.startswith("{") and '"weight_format"' in line:
            return str(json.loads(line)["weight_format"])
    raise RuntimeError(f"no weight_format in {home / 'server.log'}")


def launch(home: Path, settings: str) -> tuple[subprocess.Popen[bytes], str]:
    """``loraforge serve`` on ``home`` in a process of its own, configured by ``settings`` (YAML);
    returns once it is ready: (the process, its URL)."""
    import httpx

    port = _free_port()
    (home / "serve.yaml").write_text(settings)
    command = [sys.executable, "-m", "loraforge", "serve", "--home", str(home), "--port", str(port)]
    proc = subprocess.Popen(
        [*command, "--config", str(home / "serve.yaml")],
        stdout=subprocess.DEVNULL,
        stderr=open(home / "server.log", "wb"),  # noqa: SIM115
        env={**os.environ, "LORAFORGE_MODEL_CACHE": str(_cache())},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300  # the first start on a machine also compiles the LoRA kernel (~40 s)
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"the server did not start; see {home / 'server.log'}")


def start_server(home: Path, dirs: list[Path], weight_format: str) -> tuple[subprocess.Popen[bytes], str, str]:
    from loraforge.serve.adapters import AdapterStore
    from loraforge.serve.keys import KeyStore

    for i, d in enumerate(dirs):
        AdapterStore(home).add(d, f"adapter{i}", tenant="bench")
    key, _ = KeyStore(home).create("bench")
    proc, url = launch(
        home,
        "requests_per_minute: 100000\ntokens_per_minute: 100000000\nmax_concurrent_requests: 1000\n"
        "max_queued_per_tenant: 1000\n"
        f"max_batch_size: 16\nweight_format: {weight_format}\n",
    )
    return proc, url, key


async def _one(
    http: Any, url: str, key: str, model: str, i: int, tokens: int, stream: bool, system: str | None = None
) -> dict[str, float]:
    body = {
        "model": model,
        "messages": _messages(i, system),
        "max_tokens": tokens,
        "min_tokens": tokens,
        "temperature": 0,
    }
    headers = {"Authorization": f"Bearer {key}"}
    started = time.perf_counter()
    if not stream:
        r = await http.post(url + "/v1/chat/completions", json=body, headers=headers)
        r.raise_for_status()
        end = time.perf_counter()
        return {"latency": end - started, "ttft": end - started, "tokens": r.json()["usage"]["completion_tokens"]}
    body.update(stream=True, stream_options={"include_usage": True})
    first = None
    completion = 0
    async with http.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter()
            if chunk.get("usage"):
                completion = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"latency": end - started, "ttft": (first or end) - started, "tokens": completion}


async def _load(
    url: str, key: str, models: list[str], tokens: int, stream: bool = False
) -> tuple[float, list[dict[str, float]]]:
    import httpx

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=200)) as http:
        started = time.perf_counter()
        results = await asyncio.gather(*(_one(http, url, key, m, i, tokens, stream) for i, m in enumerate(models)))
        wall = time.perf_counter() - started
    return wall, list(results)


def batch1_ms_per_token(url: str, key: str, base_id: str) -> float:
    """Like HF generate's figure: (time for 129 tokens - time for 1 token) / 128, one request alone."""
    first = min(asyncio.run(_load(url, key, [base_id], 1))[0] for _ in range(3))
    total = min(asyncio.run(_load(url, key, [base_id], 129))[0] for _ in range(REPEATS))
    return (total - first) / 128 * 1000


def prefix_runs(url: str, key: str, model: str) -> dict[str, float]:
    """Time to first token with a ~1,000-token system prompt: its first request (prefilled whole)
    against a later one with the same system prompt and another question (its prefix reused)."""
    import httpx

    async def ttft(i: int, system: str) -> float:
        async with httpx.AsyncClient(timeout=600) as http:
            return (await _one(http, url, key, model, i, 1, True, system))["ttft"]

    cold, warm = [], []
    for version in range(REPEATS + 1):
        system = _system_prompt(version)
        cold.append(asyncio.run(ttft(0, system)))
        warm.append(asyncio.run(ttft(1 + version, system)))
    out = {"cold_ttft_s": statistics.median(cold), "warm_ttft_s": statistics.median(warm)}
    print(f"    1k-token system prompt, TTFT first / repeated: {out['cold_ttft_s']:.2f} / {out['warm_ttft_s']:.2f} s")
    return out


def loraforge_runs(url: str, key: str, base_id: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    asyncio.run(_load(url, key, ["adapter0", base_id], 4))  # warm-up, adapters loaded
    asyncio.run(_load(url, key, [f"adapter{i}" for i in range(ADAPTERS)], 2))
    adapters = [f"adapter{i % ADAPTERS}" for i in range(REQUESTS)]
    with_adapters, base_only = [], []
    for _ in range(REPEATS):  # alternated, best of each, as for PEFT
        wall, res = asyncio.run(_load(url, key, adapters, NEW_TOKENS))
        with_adapters.append(sum(r["tokens"] for r in res) / wall)
        wall, res = asyncio.run(_load(url, key, [base_id] * REQUESTS, NEW_TOKENS))
        base_only.append(sum(r["tokens"] for r in res) / wall)
    out["adapters_tok_s"], out["base_tok_s"] = max(with_adapters), max(base_only)
    print(f"(c) loraforge over HTTP, 4 adapters: {out['adapters_tok_s']:.1f} tok/s", flush=True)
    print(f"    loraforge over HTTP, base only: {out['base_tok_s']:.1f} tok/s", flush=True)
    out["decode_ms_per_token"] = batch1_ms_per_token(url, key, base_id)
    print(f"    loraforge batch 1: {out['decode_ms_per_token']:.1f} ms/token", flush=True)
    clients = [f"adapter{i % ADAPTERS}" for i in range(64)]
    wall, res = asyncio.run(_load(url, key, clients, 32, stream=True))
    lat = sorted(r["latency"] for r in res)
    ttft = sorted(r["ttft"] for r in res)
    out["latency"] = {
        "clients": 64,
        "tokens_each": 32,
        "p50_latency_s": statistics.median(lat),
        "p99_latency_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "p50_ttft_s": statistics.median(ttft),
        "p99_ttft_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
        "tok_s": sum(r["tokens"] for r in res) / wall,
    }
    print(f"    64 clients: {json.dumps(out['latency'])}", flush=True)
    out["prefix"] = prefix_runs(url, key, "adapter0")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weight-format", default="auto", help="the server's weight_format (see docs/serving.md)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("LORAFORGE_MODEL_CACHE", str(REPO / ".cache" / "models"))
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs, base = make_adapters(root / "adapters")
        peft = peft_baselines(dirs, base)
        proc, url, key = start_server(root / "home", dirs, args.weight_format)
        weight_format = served_format(root / "home")
        print(f"    loraforge serves with weight_format {weight_format}", flush=True)
        try:
            ours = loraforge_runs(url, key, base.name)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        reference_ms: dict[str, float] = {}  # batch 1 with the other formats, same run
        for other in ("fp16", "onednn"):
            if other == weight_format:
                continue
            try:
                proc, url, key = start_server(root / f"home-{other}", dirs[:1], other)
            except RuntimeError:  # e.g. a bf16 model, which only row-major holds: said in its log
                log = (root / f"home-{other}" / "server.log").read_text(errors="replace").strip().splitlines()
                print(f"    weight_format {other} cannot serve here: {log[-1][:300] if log else 'no log'}", flush=True)
                continue
            try:
                reference_ms[other] = batch1_ms_per_token(url, key, base.name)
                print(f"    loraforge batch 1, weight_format {other}: {reference_ms[other]:.1f} ms/token", flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    summary = {
        "speedup_vs_sequential": ours["adapters_tok_s"] / peft["sequential_tok_s"],
        "speedup_vs_mixed": ours["adapters_tok_s"] / peft["mixed_tok_s"],
        "adapter_overhead": ours["base_tok_s"] / ours["adapters_tok_s"] - 1,
        "peft_mixed_overhead": peft["hf_base_batch_tok_s"] / peft["mixed_tok_s"] - 1,
        "decode_ms_per_token": ours["decode_ms_per_token"],
        "hf_decode_ms_per_token": peft["hf_decode_ms_per_token"],
        "decode_speedup_vs_hf": peft["hf_decode_ms_per_token"] / ours["decode_ms_per_token"],
        "decode_ms_per_token_fp32_weights": reference_ms.get("onednn"),
        "decode_ms_per_token_fp16_weights": reference_ms.get("fp16"),
        "weight_format": weight_format,
        "p50_latency_s": ours["latency"]["p50_latency_s"],
        "p99_latency_s": ours["latency"]["p99_latency_s"],
        "p50_ttft_s": ours["latency"]["p50_ttft_s"],
        "p99_ttft_s": ours["latency"]["p99_ttft_s"],
        "system_prompt_ttft_s": ours["prefix"],
        "prefix_cache_speedup": ours["prefix"]["cold_ttft_s"] / ours["prefix"]["warm_ttft_s"],
        "tok_s": {
            "peft_sequential": peft["sequential_tok_s"],
            "peft_mixed": peft["mixed_tok_s"],
            "hf_base_batch": peft["hf_base_batch_tok_s"],
            "loraforge_adapters": ours["adapters_tok_s"],
            "loraforge_base": ours["base_tok_s"],
            "loraforge_64_clients": ours["latency"]["tok_s"],
        },
        "threads": torch.get_num_threads(),
    }
    print()
    print("| measure | PEFT / HF | loraforge | ratio |")
    print("|---|---|---|---|")
    t = summary["tok_s"]
    print(
        f"| 16 req / 4 adapters, sequential PEFT (tok/s) | {t['peft_sequential']:.1f} | {t['loraforge_adapters']:.1f} "
        f"| {summary['speedup_vs_sequential']:.2f}x |"
    )
    print(
        f"| 16 req / 4 adapters, PEFT mixed batch (tok/s) | {t['peft_mixed']:.1f} | {t['loraforge_adapters']:.1f} "
        f"| {summary['speedup_vs_mixed']:.2f}x |"
    )
    print(
        f"| adapters vs base only, same load | {summary['peft_mixed_overhead']:+.0%} | "
        f"{summary['adapter_overhead']:+.0%} | |"
    )
    print(
        f"| batch-1 decode (ms/token) | {summary['hf_decode_ms_per_token']:.1f} | "
        f"{summary['decode_ms_per_token']:.1f} | {summary['decode_speedup_vs_hf']:.2f}x |"
    )
    for other, ms in reference_ms.items():
        print(
            f"| batch-1 decode, weight_format {other} (ms/token) | {summary['hf_decode_ms_per_token']:.1f} | "
            f"{ms:.1f} | {summary['hf_decode_ms_per_token'] / ms:.2f}x |"
        )
    print(
        f"| 64 clients: p50 / p99 latency (s) | | {summary['p50_latency_s']:.2f} / {summary['p99_latency_s']:.2f} | |"
    )
    print(f"| 64 clients: p50 / p99 TTFT (s) | | {summary['p50_ttft_s']:.2f} / {summary['p99_ttft_s']:.2f} | |")
    pre = summary["system_prompt_ttft_s"]
    print(
        f"| 1k-token system prompt: TTFT first / repeated (s) | | {pre['cold_ttft_s']:.2f} / {pre['warm_ttft_s']:.2f}"
        f" | {summary['prefix_cache_speedup']:.2f}x |"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
