"""Batched log-likelihood scoring with shared prefixes, and batched greedy generation.

Multiple-choice items share one prompt and differ only in the answer. Instead of running the
prompt once per choice, an item becomes a *tree*: the prompt (prefix) followed by every choice
(branch) in one packed row. A custom attention mask lets each branch see the prefix and itself,
never another branch, and position ids restart after the prefix, so each branch is scored
exactly as if it followed the prompt alone. Many trees share a row; rows hold up to
``row_tokens`` tokens. The output head (576 × 49,152 for SmolLM2) runs only at the positions
whose next token is scored.

    row:   [prefix₁ | choice₁ₐ | choice₁ᵦ | prefix₂ | choice₂ₐ …]
    mask:  choice₁ᵦ → prefix₁ ∪ choice₁ᵦ (causal);  nothing crosses a tree
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Tree:
    """One prompt (``prefix`` token ids) and its continuations (``branches``), each scored on its own.

    ``scored`` optionally marks, per branch, which of its tokens count (default: all). A branch's
    first token is predicted from the prefix's last token, so it can only be scored when the
    prefix is not empty.
    """

    prefix: list[int]
    branches: list[list[int]]
    scored: list[list[bool]] | None = None

    @property
    def size(self) -> int:
        return len(self.prefix) + sum(len(b) for b in self.branches)


@dataclass(frozen=True)
class BranchScore:
    """Per scored token: log-probability of the true token, and whether it was the arg-max."""

    logprobs: np.ndarray  # (n,) float64
    correct: np.ndarray  # (n,) bool

    @property
    def total(self) -> float:
        return float(self.logprobs.sum())

    @property
    def mean(self) -> float:
        return float(self.logprobs.mean()) if self.logprobs.size else 0.0

    @property
    def n(self) -> int:
        return int(self.logprobs.size)


def _inner(model: Any) -> Any:
    """The causal-LM module under a PEFT wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _pack(trees: Sequence[Tree], row_tokens: int) -> list[list[int]]:
    """Greedy first-fit of tree indices into rows of at most ``row_tokens`` (a bigger tree gets its own row)."""
    order = sorted(range(len(trees)), key=lambda i: -trees[i].size)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        size = trees[i].size
        for r, free in enumerate(room):
            if size <= free:
                rows[r].append(i)
                room[r] -= size
                break
        else:
            rows.append([i])
            room.append(max(row_tokens, size) - size)
    return rows


def common_prefix_length(trees: Sequence[Tree], minimum: int = 8) -> int:
    """Tokens that every tree's prefix starts with (a chat template's system turn), keeping one
    prefix token per tree out of it; 0 when fewer than ``minimum`` are shared."""
    if len(trees) < 2 or any(not t.prefix for t in trees):
        return 0
    first = trees[0].prefix
    n = min(len(t.prefix) for t in trees) - 1
    for t in trees[1:]:
        k = 0
        while k < n and t.prefix[k] == first[k]:
            k += 1
        n = k
    return n if n >= minimum else 0


@torch.no_grad()
def score_trees(model: Any, trees: Sequence[Tree], *, row_tokens: int = 1024) -> list[list[BranchScore]]:
    """Log-probabilities of every branch of every tree, one packed forward pass per row.

    Two levels of sharing: the tokens that *every* tree starts with (the chat template's system
    turn) run once and are kept as a KV cache that every row attends to; each tree's own prefix
    runs once per tree, not once per branch.

    Args:
        model: a causal LM (plain or PEFT-wrapped) in eval mode.
        trees: the items; their order is kept in the result.
        row_tokens: tokens per packed row (a row's attention mask is ``row_tokens × (shared + row_tokens)``).

    Returns:
        ``result[i][j]``: the score of branch ``j`` of tree ``i``.

    Raises:
        ValueError: a tree asks to score a branch's first token but has no prefix.
    """
    import copy

    inner = _inner(model)
    decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    device = next(inner.parameters()).device
    dtype = next(inner.parameters()).dtype
    shared = common_prefix_length(trees)
    cache = None
    if shared:
        cache = decoder(input_ids=torch.tensor([trees[0].prefix[:shared]], device=device), use_cache=True).cache
        trees = [Tree(t.prefix[shared:], t.branches, t.scored) for t in trees]
    results: list[list[BranchScore | None]] = [[None] * len(t.branches) for t in trees]
    for row in _pack(trees, row_tokens):
        ids: list[int] = []
        pos: list[int] = []
        tree_of: list[int] = []
        branch_of: list[int] = []
        # (tree, branch, predicting position, target id) per scored token
        where: list[tuple[int, int, int, int]] = []
        for ti in row:
            tree = trees[ti]
            start = len(ids)
            ids += tree.prefix
            pos += range(shared, shared + len(tree.prefix))
            tree_of += [ti] * len(tree.prefix)
            branch_of += [-1] * len(tree.prefix)
            for bj, branch in enumerate(tree.branches):
                wanted = tree.scored[bj] if tree.scored else [True] * len(branch)
                bstart = len(ids)
                for k, tok in enumerate(branch):
                    if wanted[k]:
                        if k == 0 and not tree.prefix:
                            raise ValueError("a branch's first token can only be scored after a non-empty prefix")
                        at = bstart + k - 1 if k else start + len(tree.prefix) - 1
                        where.append((ti, bj, at, tok))
                ids += branch
                first = shared + len(tree.prefix)
                pos += range(first, first + len(branch))
                tree_of += [ti] * len(branch)
                branch_of += [bj] * len(branch)
        t_ids = torch.tensor([ids], device=device)
        t_pos = torch.tensor([pos], device=device)
        tr = torch.tensor(tree_of, device=device)
        br = torch.tensor(branch_of, device=device)
        q = torch.arange(len(ids), device=device)
        allowed = (
            (tr[:, None] == tr[None, :])
            & (q[None, :] <= q[:, None])
            & ((br[None, :] == -1) | (br[None, :] == br[:, None]))
        )  # (T, T): query row, key column
        if shared:  # every token also sees the shared start, held in the cache
            allowed = torch.cat([torch.ones(len(ids), shared, dtype=torch.bool, device=device), allowed], dim=1)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        hidden = decoder(
            input_ids=t_ids,
            position_ids=t_pos,
            attention_mask=mask[None, None],
            cache=copy.deepcopy(cache) if cache is not None else None,
            use_cache=cache is not None,
        ).last_hidden_state[0]  # (T, H)
        if not where:
            continue
        src = torch.tensor([w[2] for w in where], device=device)
        tgt = torch.tensor([w[3] for w in where], device=device)
        logits = head(hidden[src]).float()  # (N, V): only where a next token is scored
        logp = torch.log_softmax(logits, dim=-1)
        token_lp = logp.gather(1, tgt[:, None])[:, 0].double().cpu().numpy()
        correct = (logits.argmax(dim=-1) == tgt).cpu().numpy()
        collected: dict[tuple[int, int], list[int]] = {}
        for n, (ti, bj, _, _) in enumerate(where):
            collected.setdefault((ti, bj), []).append(n)
        for ti in row:
            for bj in range(len(trees[ti].branches)):
                sel = collected.get((ti, bj), [])
                results[ti][bj] = BranchScore(token_lp[sel], correct[sel])
    return [[s if s is not None else BranchScore(np.zeros(0), np.zeros(0, bool)) for s in r] for r in results]


@torch.no_grad()
def generate_greedy(
    model: Any,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    batch_size: int = 32,
) -> list[list[int]]:
    """Greedy continuations of token-id prompts, batched with left padding (prompts sorted by length).

    Returns:
        For each prompt, the new token ids up to (not including) the first end-of-sequence token.
    """
    inner = _inner(model)
    device = next(inner.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        att = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, i in enumerate(chunk):
            p = prompts[i]
            ids[r, width - len(p) :] = torch.tensor(p)
            att[r, width - len(p) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=att.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
        for r, i in enumerate(chunk):
            new = gen[r, width:].tolist()
            out[i] = new[: new.index(eos_token_id)] if eos_token_id in new else new
    return out
