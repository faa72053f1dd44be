"""Multiple-choice scoring speed: loraforge's shared-prefix packed scorer against a naive loop.

Both score the same items on SmolLM2-135M-Instruct (fp32, CPU) and must pick the same answers:

- **naive**: transformers as usually written: for every item, for every choice, one forward pass
  over prompt + choice, full-vocabulary log-softmax, sum of the choice's token log-probabilities;
- **loraforge**: ``score_trees``: each item's prompt once with all its choices as branches in
  packed rows (custom attention mask), the chat template's shared system turn once for all items
  as a KV cache, and the output head only where a choice token is predicted.

Prints a table, then one JSON line: {"speedup", "items_per_s", "baseline_items_per_s", ...}.

    .venv/bin/python bench/eval_speed.py --items 60
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from loraforge.evaluate.benchmarks import load_hellaswag, load_mmlu, load_openbookqa, subset
from loraforge.evaluate.harness import ModelPair, pick_choice
from loraforge.evaluate.scoring import Tree, common_prefix_length, score_trees
from loraforge.evaluate.suites.choice import chat_tree, text_tree
from loraforge.home import model_cache_dir
from loraforge.models.sources import DEFAULT_BASE_MODEL, load_model, load_tokenizer, resolve_base_model


@torch.no_grad()
def naive_scores(model: torch.nn.Module, trees: list[Tree]) -> list[list[float]]:
    """One forward pass per (item, choice); mean log-probability per choice token."""
    out = []
    for tree in trees:
        per_choice = []
        for branch in tree.branches:
            ids = torch.tensor([tree.prefix + branch])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            start = len(tree.prefix)
            lp = [logp[start + k - 1, t].item() for k, t in enumerate(branch)]
            per_choice.append(sum(lp) / len(lp))
        out.append(per_choice)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=60, help="items per set (MMLU, OpenBookQA, HellaSwag)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = resolve_base_model(DEFAULT_BASE_MODEL, model_cache_dir())
    tokenizer = load_tokenizer(base)
    model = load_model(base)
    model.eval()
    pair = ModelPair(model, model, tokenizer)
    trees = [chat_tree(pair, it) for it in subset(load_mmlu(), args.items, 0, "mmlu")]
    trees += [chat_tree(pair, it) for it in subset(load_openbookqa(), args.items, 0, "openbookqa")]
    trees += [text_tree(pair, it) for it in subset(load_hellaswag(), args.items, 0, "hellaswag")]
    choices = sum(len(t.branches) for t in trees)
    naive_tokens = sum(len(t.prefix) * len(t.branches) + sum(map(len, t.branches)) for t in trees)
    # the system turn every prompt starts with runs once, as a KV cache
    tree_tokens = sum(t.size for t in trees) - (len(trees) - 1) * common_prefix_length(trees)

    score_trees(model, trees[:3])  # warm-up (allocator, kernels) for both
    t0 = time.perf_counter()
    ours = score_trees(model, trees)
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = naive_scores(model, trees)
    naive_s = time.perf_counter() - t0

    ours_picks = [pick_choice(s) for s in ours]
    naive_picks = [max(range(len(s)), key=s.__getitem__) for s in naive]
    agree = sum(a == b for a, b in zip(ours_picks, naive_picks, strict=True)) / len(trees)
    max_diff = max(abs(o.mean - n) for os_, ns in zip(ours, naive, strict=True) for o, n in zip(os_, ns, strict=True))
    n = len(trees)
    rows = [
        ("naive: one forward per choice", naive_s, n / naive_s, naive_tokens),
        ("loraforge: shared-prefix packed rows", ours_s, n / ours_s, tree_tokens),
    ]
    print(
        f"{n} items ({args.items} each of MMLU, OpenBookQA, HellaSwag), {choices} choices, "
        f"{torch.get_num_threads()} threads, {base.name}"
    )
    print(f"{'method':<40} {'seconds':>8} {'items/s':>8} {'tokens run':>11}")
    for name, s, ips, toks in rows:
        print(f"{name:<40} {s:>8.1f} {ips:>8.2f} {toks:>11,}")
    print(f"same picks on {agree:.0%} of items; largest difference in a choice's mean log-probability {max_diff:.2e}")
    print(
        json.dumps(
            {
                "speedup": round(naive_s / ours_s, 2),
                "items_per_s": round(n / ours_s, 2),
                "baseline_items_per_s": round(n / naive_s, 2),
                "items": n,
                "choices": choices,
                "tokens_run": tree_tokens,
                "baseline_tokens_run": naive_tokens,
                "agreement": agree,
                "max_abs_diff": max_diff,
                "threads": torch.get_num_threads(),
                "model": base.name,
                "path": str(Path(base.path)),
            }
        )
    )


if __name__ == "__main__":
    main()
