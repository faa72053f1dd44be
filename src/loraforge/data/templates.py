"""Chat templates and label masks.

An example is rendered with the base model's own chat template and tokenized once. Labels are
kept only on the tokens of trained assistant turns: the assistant's content and the template's
end-of-turn marker (``<|im_end|>``, ``<|eot_id|>``…), never the role header that precedes it,
the whitespace the template puts after it, or any system/user text. An assistant message with
``weight: 0`` is rendered as context and not labelled.

How the span of a turn is found, for any template: render the conversation up to the turn with
``add_generation_prompt=True`` (prefix P), then up to and including the turn (text Q). Q must
start with P; the turn's trained text is ``Q[len(P):]`` with trailing whitespace removed. Tokens
whose character offsets fall inside that span get labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from loraforge.data.formats import Example
from loraforge.errors import DataError, ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


class TemplateError(DataError):
    """The chat template refuses a conversation (e.g. a template that requires alternating roles)."""


Overlong = Literal["truncate", "drop"]


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where the token is not trained on
    file: str
    line: int
    truncated: bool = False

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            "the base model's tokenizer has no chat template; use an instruction-tuned model or add "
            "a chat_template to its tokenizer_config.json"
        )
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja2 raises its own errors (e.g. "roles must alternate")
        raise TemplateError(str(e)) from e
    return str(text)


def trained_spans(tokenizer: PreTrainedTokenizerBase, example: Example) -> tuple[str, list[tuple[int, int]]]:
    """Render ``example`` and return the text with the character spans to train on."""
    msgs = [{"role": m.role, "content": m.content} for m in example.messages]
    full = render(tokenizer, msgs, generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(example.messages):
        if m.role != "assistant" or m.weight == 0:
            continue
        prefix = render(tokenizer, msgs[:i], generation_prompt=True)
        upto = render(tokenizer, msgs[: i + 1], generation_prompt=False)
        if not upto.startswith(prefix) or not full.startswith(upto):
            raise ModelError(
                "the chat template does not render conversations incrementally (a prefix of the "
                "conversation renders differently inside the whole); labels cannot be placed safely"
            )
        spans.append((len(prefix), len(upto.rstrip())))
    return full, spans


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase,
    example: Example,
    max_length: int,
    overlong: Overlong = "truncate",
) -> TokenizedExample | None:
    """Tokenize one example with its label mask.

    Args:
        tokenizer: a fast tokenizer with a chat template.
        example: the conversation.
        max_length: the context length in tokens.
        overlong: ``truncate`` keeps the first ``max_length`` tokens; ``drop`` discards the example.

    Returns:
        The tokens and labels, or None when the example was dropped (too long with ``drop``, or
        truncation left no trained token).
    """
    if not tokenizer.is_fast:
        raise ModelError("loraforge needs a fast (Rust) tokenizer to place labels; this one is slow")
    text, spans = trained_spans(tokenizer, example)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for t, (start, end) in enumerate(enc["offset_mapping"]):
        if end > start and any(s <= start and end <= e for s, e in spans):
            labels[t] = ids[t]
    truncated = False
    if len(ids) > max_length:
        if overlong == "drop":
            return None
        ids, labels, truncated = ids[:max_length], labels[:max_length], True
    result = TokenizedExample(ids, labels, example.file, example.line, truncated)
    return result if result.num_trained else None


def tokenize_all(
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    max_length: int,
    overlong: Overlong = "truncate",
) -> tuple[list[TokenizedExample], int, int]:
    """Tokenize every example; return (kept, number truncated, number dropped)."""
    kept: list[TokenizedExample] = []
    truncated = dropped = 0
    for ex in examples:
        tok = tokenize_example(tokenizer, ex, max_length, overlong)
        if tok is None:
            dropped += 1
            continue
        truncated += tok.truncated
        kept.append(tok)
    if not kept:
        raise DataError(
            f"no example is left to train on after tokenization ({dropped} dropped as longer than "
            f"{max_length} tokens); raise the context length or shorten the examples"
        )
    return kept, truncated, dropped
