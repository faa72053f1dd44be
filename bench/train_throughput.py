"""Training throughput: loraforge against the way most tutorials fine-tune, in the same run.

(a) baseline: plain PEFT + transformers ``Trainer``, padded batches of 8, fp32 — the usual tutorial.
(b) loraforge: ``loraforge.train.train`` with the same LoRA config, the same examples (so the same
    number of real, non-padding tokens: one pass over them), the same assistant-only labels, the
    same LoRA dropout and learning-rate schedule.

Each side runs in its own process (so peak RSS is its own). Quality is the validation loss on the
assistant tokens of the held-out sample split, computed the same way for both adapters (plain
PEFT on the fp32 base, one example at a time). Achieved GFLOP/s use 4·N per real token for the
decoder's linear layers plus 4·H·V per trained token for the output head, against the fp32 and
bf16 matmul peaks measured here.

    python bench/train_throughput.py [--examples 120] [--json-only]

The last line of output is one JSON object (speedup, memory_ratio, loss_delta, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "src" / "loraforge" / "samples"
LORA = {"r": 16, "alpha": 32.0, "dropout": 0.0}
LR = 1e-3
SEED = 42


def _cache() -> Path:
    from loraforge.home import model_cache_dir

    return model_cache_dir()


def _examples(n: int) -> tuple[Any, list[Any]]:
    from loraforge.data.formats import load_dataset
    from loraforge.data.templates import tokenize_all
    from loraforge.models.sources import DEFAULT_BASE_MODEL, load_tokenizer, resolve_base_model

    base = resolve_base_model(DEFAULT_BASE_MODEL, _cache())
    tok = load_tokenizer(base)
    examples = load_dataset(SAMPLES / "support.jsonl").examples[:n]
    kept, _, _ = tokenize_all(tok, examples, 1024)
    return base, kept


def run_baseline(n: int, out: Path) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    base, examples = _examples(n)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(str(base.path), dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), 2, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k], labels[i, :k], mask[i, :k] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=8,
        num_train_epochs=1,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, int(0.1 * -(-len(rows) // 8))),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=SEED,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)  # type: ignore[arg-type]
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    model.save_pretrained(str(out / "adapter"))
    tokens = sum(len(e.input_ids) for e in examples)
    trained = sum(e.num_trained for e in examples)
    padded = sum(
        8 * max(len(e.input_ids) for e in examples[i : i + 8]) for i in range(0, len(examples), 8)
    )  # upper bound: the trainer shuffles, so batches differ; reported as an estimate
    return {"seconds": seconds, "tokens": tokens, "trained_tokens": trained, "padded_tokens_estimate": padded}


def run_loraforge(n: int, out: Path, seq_len: int) -> dict[str, Any]:
    from loraforge.train import TrainConfig, train

    data = out / "data.jsonl"
    lines = (SAMPLES / "support.jsonl").read_text().splitlines()[:n]
    data.write_text("\n".join(lines) + "\n")
    cfg = TrainConfig(
        data=str(data),
        validation=str(SAMPLES / "support_holdout.jsonl"),
        output=str(out / "adapter"),
        epochs=1,
        lora_r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        learning_rate=LR,
        eval_every=0,
        checkpoint_every=0,
        allow_unlicensed=True,
        seed=SEED,
        warmup_ratio=0.1,
        min_lr_ratio=0.0,
        seq_len=seq_len,
    )
    result = train(cfg, model_cache=_cache())
    return {
        "seconds": result.figures.seconds,
        "tokens": result.figures.tokens,
        "trained_tokens": result.figures.trained_tokens,
        "dtype": result.manifest["precision"]["base"],
    }


def validation_loss(adapter: Path) -> float:
    """Mean loss per assistant token of the held-out split, plain PEFT on the fp32 base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraforge.data.formats import load_dataset
    from loraforge.data.templates import IGNORE_INDEX, tokenize_all
    from loraforge.models.sources import DEFAULT_BASE_MODEL, load_tokenizer, resolve_base_model

    base = resolve_base_model(DEFAULT_BASE_MODEL, _cache())
    tok = load_tokenizer(base)
    examples, _, _ = tokenize_all(tok, load_dataset(SAMPLES / "support_holdout.jsonl").examples, 1024)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base.path)), str(adapter)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1].float()
            target = torch.tensor(e.labels[1:])
            keep = target != IGNORE_INDEX
            total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


def _child(kind: str, n: int, out: Path) -> None:
    import resource

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    result = run_baseline(n, out) if kind == "baseline" else run_loraforge(n, out, int(kind.split("-")[1]))
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    (out / "result.json").write_text(json.dumps(result))


def _flops(n_examples: int, tokens: int, trained: int) -> float:
    import torch

    from loraforge.models.sources import DEFAULT_BASE_MODEL, load_model, resolve_base_model
    from loraforge.train.estimate import linear_params, step_flops

    model = load_model(resolve_base_model(DEFAULT_BASE_MODEL, _cache()), dtype=torch.float32)
    n_linear, n_head = linear_params(model)
    return step_flops(n_linear, n_head, tokens, trained)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=120, help="training examples (one pass)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.examples, args.out)
        return

    import torch

    from loraforge.train.estimate import matmul_peak_gflops

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="lf-bench-") as tmp:
        for kind in ("baseline", "loraforge-1024", "loraforge-512"):
            out = Path(tmp) / kind
            out.mkdir()
            print(f"running {kind} on {args.examples} examples ...", flush=True)
            subprocess.run(
                [sys.executable, __file__, "--child", kind, "--examples", str(args.examples), "--out", str(out)],
                check=True,
            )
            results[kind] = json.loads((out / "result.json").read_text())
            results[kind]["val_loss"] = validation_loss(out / "adapter")
    peaks = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}
    base = results["baseline"]
    for r in results.values():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["gflops"] = _flops(args.examples, r["tokens"], r["trained_tokens"]) / r["seconds"] / 1e9
    lf = results["loraforge-1024"]  # the default configuration
    summary = {
        "examples": args.examples,
        "speedup": lf["tokens_per_s"] / base["tokens_per_s"],
        "memory_ratio": lf["peak_rss_bytes"] / base["peak_rss_bytes"],
        "loss_delta": (lf["val_loss"] - base["val_loss"]) / base["val_loss"],
        "results": results,
        "matmul_peak_gflops": peaks,
        "threads": torch.get_num_threads(),
    }
    print()
    print(
        f"| run | real tokens/s | peak RSS | validation loss | GFLOP/s (fp32 peak {peaks['fp32']:.0f}, "
        f"bf16 peak {peaks['bf16']:.0f}) | tokens/s ratio | memory ratio | loss delta |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    names = {
        "baseline": "(a) PEFT + Trainer, padded batches of 8, fp32",
        "loraforge-1024": f"(b) loraforge, default: rows of 1024 ({lf['dtype']})",
        "loraforge-512": "(b') loraforge, rows of 512",
    }
    for kind, r in results.items():
        print(
            f"| {names[kind]} | {r['tokens_per_s']:.1f} | {r['peak_rss_bytes'] / 1e9:.2f} GB | {r['val_loss']:.4f} | "
            f"{r['gflops']:.1f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}× | "
            f"{r['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}× | "
            f"{(r['val_loss'] - base['val_loss']) / base['val_loss']:+.1%} |"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
