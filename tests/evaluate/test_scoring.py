"""Shared-prefix packed scoring and batched greedy generation agree with plain transformers calls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraforge.evaluate.scoring import Tree, generate_greedy, score_trees


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def _naive(model, prefix: list[int], branch: list[int]) -> list[float]:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prefix + branch])).logits[0].float(), -1)
    return [logp[len(prefix) + k - 1, t].item() for k, t in enumerate(branch)]


def test_packed_trees_match_one_forward_per_choice(tiny) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    trees = []
    for n in range(7):
        prefix = torch.randint(5, 4000, (3 + 5 * n,), generator=g).tolist()
        branches = [torch.randint(5, 4000, (1 + (n + j) % 6,), generator=g).tolist() for j in range(2 + n % 3)]
        trees.append(Tree(prefix, branches))
    results = score_trees(tiny, trees, row_tokens=64)  # forces several rows, trees sharing rows
    for tree, scores in zip(trees, results, strict=True):
        for branch, score in zip(tree.branches, scores, strict=True):
            torch.testing.assert_close(
                torch.tensor(score.logprobs),
                torch.tensor(_naive(tiny, tree.prefix, branch), dtype=torch.float64),
                atol=1e-4,
                rtol=0,
            )


def test_scored_masks_and_empty_prefix(tiny) -> None:  # type: ignore[no-untyped-def]
    ids = [11, 22, 33, 44, 55, 66]
    scored = [False, False, True, True, False, True]
    (result,) = score_trees(tiny, [Tree([], [ids], [scored])])
    naive = _naive(tiny, [ids[0]], ids[1:])  # position k is predicted from the k-1 tokens before it
    assert result[0].n == 3
    torch.testing.assert_close(
        torch.tensor(result[0].logprobs),
        torch.tensor([naive[1], naive[2], naive[4]], dtype=torch.float64),
        atol=1e-4,
        rtol=0,
    )
    with pytest.raises(ValueError, match="non-empty prefix"):
        score_trees(tiny, [Tree([], [[1, 2]])])


def test_batched_generation_matches_one_at_a_time(tiny) -> None:  # type: ignore[no-untyped-def]
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15]]
    batched = generate_greedy(tiny, prompts, max_new_tokens=6, eos_token_id=2, pad_token_id=0, batch_size=3)
    single = [generate_greedy(tiny, [p], max_new_tokens=6, eos_token_id=2, pad_token_id=0)[0] for p in prompts]
    assert batched == single


def test_a_start_shared_by_every_tree_runs_once_and_changes_nothing(tiny) -> None:  # type: ignore[no-untyped-def]
    from loraforge.evaluate.scoring import common_prefix_length

    system = list(range(100, 130))  # like a chat template's system turn
    trees = [Tree([*system, 7 + i, 8 + i], [[40 + i], [50, 51 + i], [60, 61, 62]]) for i in range(5)]
    assert common_prefix_length(trees) == 30
    for tree, scores in zip(trees, score_trees(tiny, trees, row_tokens=32), strict=True):
        for branch, score in zip(tree.branches, scores, strict=True):
            torch.testing.assert_close(
                torch.tensor(score.logprobs),
                torch.tensor(_naive(tiny, tree.prefix, branch), dtype=torch.float64),
                atol=1e-4,
                rtol=0,
            )
    # a tree whose prefix is only the shared start keeps one token of its own
    assert common_prefix_length([Tree(system, [[1]]), Tree([*system, 5], [[1]])]) == 29
