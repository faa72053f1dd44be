"""How a row's tokens are chosen, and how a prompt is scored: sampling and log-probabilities."""

from __future__ import annotations

import math

import torch

from loraforge.serve.generation import PromptEvent
from loraforge.serve.rows import Row

GREEDY_BELOW = 1e-5  # temperatures below this are greedy: dividing logits by less overflows float32
SEED_LIMIT = 2**63  # torch.Generator seeds are signed 64-bit
PROMPT_LOGPROB_CHUNK = 256  # positions whose log-softmax over the vocabulary is held at once


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """A token drawn from ``softmax(logits / temperature)`` within the ``top_p`` nucleus.

    Non-finite probabilities (logits of inf or nan, or a temperature that overflows them) never
    reach the sampler: the row then takes the most likely token instead.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
        return int(torch.nan_to_num(logits.float(), nan=-math.inf).argmax())
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p  # always keeps the top token
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def prompt_event(prompt: list[int], logits: torch.Tensor, top: int) -> PromptEvent:
    """Log-probabilities of each prompt token (position t predicts t+1), in chunks of positions."""
    chosen: list[float | None] = [None]
    alternatives: list[list[tuple[int, float]] | None] = [None]
    targets = torch.tensor(prompt[1:], dtype=torch.long)
    for start in range(0, len(prompt) - 1, PROMPT_LOGPROB_CHUNK):
        end = min(len(prompt) - 1, start + PROMPT_LOGPROB_CHUNK)
        logprobs = torch.log_softmax(logits[start:end].float(), dim=-1)  # (chunk, vocab)
        chosen.extend(logprobs.gather(1, targets[start:end, None])[:, 0].tolist())
        if top:
            values, indices = torch.topk(logprobs, top, dim=-1)
            alternatives.extend(
                list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)
            )
        else:
            alternatives.extend([None] * (end - start))
    return PromptEvent(list(prompt), chosen, alternatives)


def score_prompt(row: Row, logits: torch.Tensor, start: int) -> None:
    """Add the log-probabilities of the prompt tokens that ``logits`` (positions ``start``.., one
    row each) predict to ``row.scores``."""
    scores, prompt = row.scores, row.gen.request.prompt
    assert scores is not None
    end = min(start + logits.shape[0], len(prompt) - 1)  # position t predicts token t + 1
    if end > start:
        part = prompt_event(prompt[start : end + 1], logits[: end - start], row.gen.request.params.logprobs or 0)
        scores.logprobs.extend(part.logprobs[1:])
        scores.top_logprobs.extend(part.top_logprobs[1:])
