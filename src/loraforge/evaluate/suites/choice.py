"""Multiple-choice items as scoring trees: one prompt, every choice a branch (see ``scoring``)."""

from __future__ import annotations

from collections.abc import Sequence

from loraforge.evaluate.benchmarks import ChoiceItem
from loraforge.evaluate.harness import SIDES, ModelPair, Side, pick_choice
from loraforge.evaluate.scoring import BranchScore, Tree


def chat_tree(pair: ModelPair, item: ChoiceItem) -> Tree:
    """The question (after its passage, if any) as a user turn; each choice as the assistant's answer."""
    user = f"{item.context}\n\n{item.question}" if item.context else item.question
    return Tree(pair.chat_prompt(user), [pair.encode(c) for c in item.choices])


def text_tree(pair: ModelPair, item: ChoiceItem) -> Tree:
    """Plain-text completion: the context, then each ending after a space (HellaSwag's form)."""
    return Tree(pair.encode(item.question), [pair.encode(" " + c) for c in item.choices])


def score_items(
    pair: ModelPair, items: Sequence[ChoiceItem], *, plain_text: bool = False
) -> dict[Side, list[list[BranchScore]]]:
    trees = [text_tree(pair, it) if plain_text else chat_tree(pair, it) for it in items]
    return {side: pair.score(side, trees) for side in SIDES}


def picks(scores: list[list[BranchScore]]) -> list[int]:
    return [pick_choice(s) for s in scores]
