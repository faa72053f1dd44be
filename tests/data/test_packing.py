"""Packing: every example once, targets never cross examples, no attention leakage."""

from __future__ import annotations

import torch

from loraforge.data.formats import Example, Message
from loraforge.data.packing import collate_rows, pack_examples
from loraforge.data.templates import IGNORE_INDEX, TokenizedExample, tokenize_example
from loraforge.models.packed_attention import register_packed_attention
from loraforge.models.sources import load_model, resolve_base_model
from loraforge.train.lora import LabelOnlyLM, add_lora


def _examples(tokenizer, n: int = 9) -> list[TokenizedExample]:  # type: ignore[no-untyped-def]
    out = []
    for i in range(n):
        ex = Example(
            (
                Message("user", f"Question {i}: " + "why " * i),
                Message("assistant", f"Answer {i}. " * (i % 3 + 1)),
            ),
            "x",
            i + 1,
        )
        tok = tokenize_example(tokenizer, ex, 256)
        assert tok is not None
        out.append(tok)
    return out


def test_every_example_packed_once_within_capacity(tokenizer) -> None:  # type: ignore[no-untyped-def]
    examples = _examples(tokenizer, 20)
    rows = pack_examples(examples, 128, shuffle_seed=3)
    assert all(len(r.input_ids) <= 128 for r in rows)
    assert sorted(n for r in rows for n in r.lengths) == sorted(len(e.input_ids) for e in examples)
    assert sum(r.num_targets for r in rows) == sum(e.num_trained for e in examples)
    assert len(rows) < len(examples)  # it actually packs
    # same seed, same rows: a data position is reproducible from a step number
    assert [r.input_ids for r in pack_examples(examples, 128, shuffle_seed=3)] == [r.input_ids for r in rows]


def test_targets_and_positions_restart_per_example(tokenizer) -> None:  # type: ignore[no-untyped-def]
    rows = pack_examples(_examples(tokenizer, 4), 1024)
    row = rows[0]
    start = 0
    for n in row.lengths:
        assert row.position_ids[start : start + n] == list(range(n))
        assert row.targets[start + n - 1] == IGNORE_INDEX  # last token predicts nothing across the boundary
        start += n
    batch = collate_rows(rows, pad_id=2, length=len(row.input_ids) + 5)
    assert batch.num_tokens == len(row.input_ids)
    assert (batch.targets[0, -5:] == IGNORE_INDEX).all()
    assert batch.position_ids[0, -5:].tolist() == [0, 1, 2, 3, 4]


def test_packed_losses_equal_unpacked(tokenizer, tiny_model_dir, model_cache) -> None:  # type: ignore[no-untyped-def]
    base = resolve_base_model(str(tiny_model_dir), model_cache)
    torch.manual_seed(0)
    model = load_model(base, attn_implementation=register_packed_attention())
    net = LabelOnlyLM(
        add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear", use_rslora=False, use_dora=False)
    )
    net.eval()
    examples = _examples(tokenizer, 6)
    packed = collate_rows(pack_examples(examples, 2048), pad_id=2)
    assert packed.input_ids.shape[0] == 1
    with torch.no_grad():
        packed_losses = net.token_losses(packed.input_ids, packed.position_ids, packed.targets)[0]
        start = 0
        for n in pack_examples(examples, 2048)[0].lengths:
            alone = collate_rows(pack_examples([e for e in examples if len(e.input_ids) == n][:1], 2048), pad_id=2)
            single = net.token_losses(alone.input_ids, alone.position_ids, alone.targets)[0]
            torch.testing.assert_close(packed_losses[start : start + n], single[:n], atol=1e-5, rtol=1e-4)
            start += n
        # the same holds through transformers' own mask path (SDPA with the block-diagonal mask)
        model.config._attn_implementation = "sdpa"
        sdpa = net.token_losses(packed.input_ids, packed.position_ids, packed.targets)[0]
        torch.testing.assert_close(sdpa, packed_losses, atol=1e-5, rtol=1e-4)
