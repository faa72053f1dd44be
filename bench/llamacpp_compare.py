"""llama.cpp against loraforge on the same adapter: what a CPU user gives up or gains.

One run, the same prompts, the same thread count (all cores, as both pick by default here: 2 on
the CI machine), batch 1, greedy:

(a) llama.cpp through ``llama-cpp-python``: the packaged base GGUF (Q4_1) with the adapter exported
    by ``loraforge export gguf --adapter-only`` (f16), loaded with ``lora_path``;
(b) the loraforge server (``loraforge serve`` in its own process, default settings) with the same
    adapter registered, over HTTP with streaming.

Prompt tokens/s: a ~600-token prompt, prefilled (llama.cpp: ``eval`` after ``reset``; loraforge:
time to the first streamed token with ``max_tokens: 1``, the prompt made new each time so that the
server's prefix cache cannot answer it).

Decode ms/token: (time for 129 tokens - time for 1) / 128, after the long prompt (``ratio``) and
after a short one (``ratio_short``). Both sides make all 129 tokens (``min_tokens`` on loraforge;
llama.cpp's ``generate`` does not stop at the end of turn).

Each side is measured three times, alternated, keeping the best (the shared machine's slow spells
then hit neither side alone). The adapter is trained for 4 steps on the sample data first
(``loraforge train``; a minute), so the figures are for a real loraforge adapter.

    python bench/llamacpp_compare.py [--precision auto|fp32|bf16]

``--precision`` is the server's setting (default ``auto``, what ``loraforge serve`` does).

The last line of output is one JSON object with ``llamacpp_ms_per_token``,
``loraforge_ms_per_token`` and ``ratio`` (loraforge over llama.cpp: below 1, loraforge decodes faster).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from noisy_neighbour import cpu_features
from serve_throughput import _cache, launch

REPO = Path(__file__).resolve().parents[1]
REPEATS = 3
THREADS = os.cpu_count() or 1
QUESTION = "Summarise our return policy for a customer in three short sentences."


def long_prompt() -> str:
    clauses = [
        f"Clause {n}: items of category {n % 7} may be returned within {14 + n % 3 * 7} days if unused."
        for n in range(1, 26)
    ]
    return "Support policy.\n" + "\n".join(clauses) + "\n" + QUESTION


def train_adapter(root: Path) -> Path:
    from loraforge.train import TrainConfig, train

    lines = (REPO / "src/loraforge/samples/support.jsonl").read_text().splitlines()[:24]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    config = TrainConfig(
        data=str(root / "data.jsonl"),
        output=str(root / "support"),
        max_steps=4,
        seq_len=512,
        eval_every=0,
        allow_unlicensed=True,
    )
    return train(config, model_cache=_cache()).output


def llamacpp_runs(base: Path, lora: Path, prompt_ids: list[int], short_ids: list[int]) -> dict[str, float]:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(base), lora_path=str(lora), n_ctx=2048, n_threads=THREADS, n_batch=512, verbose=False
    )

    def prefill() -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt_ids)
        return time.perf_counter() - start

    def decode(tokens: int, ids: list[int] = prompt_ids) -> float:
        llm.reset()
        start = time.perf_counter()
        for made, _ in enumerate(llm.generate(ids, top_k=1, temp=0.0, reset=True), start=1):
            if made == tokens:
                break
        return time.perf_counter() - start

    return {
        "prefill_s": prefill(),
        "t1": decode(1),
        "t129": decode(129),
        "s1": decode(1, short_ids),
        "s129": decode(129, short_ids),
    }


def loraforge_runs(url: str, key: str, model: str, prompt: str) -> dict[str, float]:
    import httpx

    def timed(tokens: int, text: str = prompt) -> float:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": tokens,
            "temperature": 0,
            "min_tokens": tokens,
            "stream": True,
        }
        start = time.perf_counter()
        with httpx.stream(
            "POST", url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=600
        ) as response:
            response.raise_for_status()
            for _ in response.iter_lines():
                pass
        return time.perf_counter() - start

    # the server keeps prefixes it has seen: a prompt of its own (the same length) for the prefill
    fresh = f"Request {time.time_ns() % 10**6:06d}. " + prompt
    return {
        "prefill_s": timed(1, fresh),
        "t1": timed(1),
        "t129": timed(129),
        "s1": timed(1, QUESTION),
        "s129": timed(129, QUESTION),
    }


def served_settings(home: Path) -> dict[str, str]:
    """The precision and weight format the server chose, from its start-up log line."""
    for line in (home / "server.log").read_text(errors="replace").splitlines():
        if line.startswith("{") and '"weight_format"' in line:
            found = json.loads(line)
            return {k: str(found.get(k)) for k in ("precision", "weight_format", "lora_kernel")}
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    args = parser.parse_args()
    from loraforge.data.templates import render
    from loraforge.export.gguf import export_gguf
    from loraforge.models.sources import DEFAULT_BASE_MODEL, gguf_file_of, load_tokenizer, resolve_base_model
    from loraforge.serve.adapters import AdapterStore
    from loraforge.serve.keys import KeyStore

    print(f"CPU: {cpu_features()}; threads: {THREADS}", flush=True)
    base_gguf = gguf_file_of(DEFAULT_BASE_MODEL)
    assert base_gguf is not None
    tokenizer = load_tokenizer(resolve_base_model(DEFAULT_BASE_MODEL, _cache()))
    prompt = long_prompt()
    ids, short = (
        tokenizer(
            render(tokenizer, [{"role": "user", "content": p}], generation_prompt=True), add_special_tokens=False
        )["input_ids"]
        for p in (prompt, QUESTION)
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapter = train_adapter(root)
        lora = root / "support-lora.gguf"
        export_gguf(adapter, lora, model_cache=_cache(), type="f16", adapter_only=True)
        home = root / "home"
        AdapterStore(home).add(adapter, "support", tenant="bench")
        key, _ = KeyStore(home).create("bench")
        settings = f"requests_per_minute: 100000\ntokens_per_minute: 100000000\nprecision: {args.precision}\n"
        proc, url = launch(home, settings)
        try:
            llama: list[dict[str, float]] = []
            ours: list[dict[str, float]] = []
            for _ in range(REPEATS):
                llama.append(llamacpp_runs(base_gguf, lora, ids, short))
                ours.append(loraforge_runs(url, key, "support", prompt))
            served = served_settings(home)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    def best(runs: list[dict[str, float]]) -> dict[str, float]:
        prefill = min(r["prefill_s"] for r in runs)
        decode = min((r["t129"] - r["t1"]) / 128 for r in runs)
        decode_short = min((r["s129"] - r["s1"]) / 128 for r in runs)
        return {
            "prompt_tokens_per_s": round(len(ids) / prefill, 1),
            "ms_per_token": round(decode * 1000, 2),
            "ms_per_token_short": round(decode_short * 1000, 2),
        }

    a, b = best(llama), best(ours)
    print(f"loraforge server: {served}", flush=True)
    print(f"prompts of {len(ids)} and {len(short)} tokens, 128 decoded tokens, batch 1, {THREADS} threads")
    for label, side in (("llama.cpp (Q4_1 base GGUF + f16 LoRA GGUF)", a), ("loraforge server (same adapter)", b)):
        print(
            f"  {label}: {side['prompt_tokens_per_s']} prompt tok/s; decode {side['ms_per_token']} ms/token "
            f"after the long prompt, {side['ms_per_token_short']} after the short one",
            flush=True,
        )
    result: dict[str, Any] = {
        "cpu": cpu_features(),
        "threads": THREADS,
        "server": served,
        "prompt_tokens": len(ids),
        "llamacpp_prompt_tokens_per_s": a["prompt_tokens_per_s"],
        "loraforge_prompt_tokens_per_s": b["prompt_tokens_per_s"],
        "llamacpp_ms_per_token": a["ms_per_token"],
        "loraforge_ms_per_token": b["ms_per_token"],
        "short_prompt_tokens": len(short),
        "llamacpp_ms_per_token_short": a["ms_per_token_short"],
        "loraforge_ms_per_token_short": b["ms_per_token_short"],
        "prompt_ratio": round(b["prompt_tokens_per_s"] / a["prompt_tokens_per_s"], 2),
        "ratio_short": round(b["ms_per_token_short"] / a["ms_per_token_short"], 2),
        "ratio": round(b["ms_per_token"] / a["ms_per_token"], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
