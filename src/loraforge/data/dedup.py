"""Exact and near-duplicate examples, and contamination between training and evaluation data.

Exact duplicates: same messages after normalising case, whitespace and punctuation (a hash).
Near duplicates: MinHash signatures over word 3-gram shingles with locality-sensitive hashing
(datasketch); a candidate pair is confirmed when its estimated Jaccard similarity reaches the
threshold. Contamination: evaluation examples that are exact or near copies of training ones.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loraforge.data.formats import Example

if TYPE_CHECKING:
    from datasketch import MinHash

# Estimated Jaccard similarity from which two examples count as near duplicates: the one default of
# training's near_duplicate_threshold, `data check --threshold` and the contamination checks.
NEAR_DUPLICATE_THRESHOLD = 0.8
NUM_PERM = 128
MAX_CANDIDATES = 32  # per example: a duplicate needs one match, a big cluster must not cost O(n²)
_WORD = re.compile(r"\w+", re.UNICODE)


def normalized_text(example: Example) -> str:
    """User and assistant turns joined with their roles, lower-cased, punctuation dropped, whitespace
    collapsed. System prompts are left out: datasets often repeat one long system prompt in every
    record, which would make unrelated examples look alike (and hide copies that lack it)."""
    return " | ".join(
        f"{m.role}: {' '.join(_WORD.findall(m.content.lower()))}" for m in example.messages if m.role != "system"
    )


def _shingles(text: str, n: int = 3) -> set[bytes]:
    words = text.split()
    if len(words) < n:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)}


@functools.cache
def _permutations() -> tuple[Any, str]:
    from datasketch import MinHash

    template = MinHash(num_perm=NUM_PERM, seed=1)
    return template.permutations, template.scheme


def minhash(example: Example) -> MinHash:
    from datasketch import MinHash

    permutations, scheme = _permutations()  # made once and shared, not per example
    m = MinHash(num_perm=NUM_PERM, seed=1, permutations=permutations, scheme=scheme)
    m.update_batch(list(_shingles(normalized_text(example))))
    return m


@dataclass
class DuplicateReport:
    exact_groups: list[list[int]] = field(default_factory=list)  # indices; the first of each group is kept
    # (earlier example, duplicate, similarity): one pair per near-duplicate, its best match among
    # the first MAX_CANDIDATES that LSH proposes
    near_pairs: list[tuple[int, int, float]] = field(default_factory=list)
    threshold: float = NEAR_DUPLICATE_THRESHOLD

    def duplicates(self) -> set[int]:
        """Indices a dedupe removes: all but the first of each exact group and of each near-duplicate cluster."""
        drop = {i for g in self.exact_groups for i in g[1:]}
        parent: dict[int, int] = {}

        def root(i: int) -> int:
            while parent.get(i, i) != i:
                i = parent[i]
            return i

        for a, b, _ in self.near_pairs:
            ra, rb = root(a), root(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        drop |= {i for i in parent if root(i) != i}
        return drop


def find_duplicates(examples: list[Example], threshold: float = NEAR_DUPLICATE_THRESHOLD) -> DuplicateReport:
    """Exact groups and near-duplicate pairs among ``examples`` (indices into the list)."""
    from datasketch import MinHashLSH

    if not 0 < threshold <= 1:
        raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
    report = DuplicateReport(threshold=threshold)
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(hashlib.sha256(normalized_text(ex).encode()).hexdigest(), []).append(i)
    report.exact_groups = [g for g in groups.values() if len(g) > 1]
    firsts = [g[0] for g in groups.values()]  # near-duplicates among distinct texts only
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    signatures: dict[int, MinHash] = {}
    for i in firsts:
        sig = minhash(examples[i])
        candidates = sorted(lsh.query(sig))[:MAX_CANDIDATES]
        best = max(((float(sig.jaccard(signatures[j])), j) for j in candidates), default=None)
        if best is not None and best[0] >= threshold:
            report.near_pairs.append((best[1], i, round(best[0], 3)))
        lsh.insert(i, sig)
        signatures[i] = sig
    return report


@dataclass(frozen=True)
class Contamination:
    eval_index: int
    train_index: int
    similarity: float  # 1.0 for an exact copy


def find_contamination(
    train: list[Example], evaluation: list[Example], threshold: float = NEAR_DUPLICATE_THRESHOLD
) -> list[Contamination]:
    """Evaluation examples that are exact or near copies of a training example."""
    from datasketch import MinHashLSH

    exact = {hashlib.sha256(normalized_text(ex).encode()).hexdigest(): i for i, ex in enumerate(train)}
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    signatures = {}
    for i, ex in enumerate(train):
        signatures[i] = minhash(ex)
        lsh.insert(i, signatures[i])
    found = []
    for k, ex in enumerate(evaluation):
        digest = hashlib.sha256(normalized_text(ex).encode()).hexdigest()
        if digest in exact:
            found.append(Contamination(k, exact[digest], 1.0))
            continue
        sig = minhash(ex)
        candidates = sorted(lsh.query(sig))[:MAX_CANDIDATES]
        best = max(((float(sig.jaccard(signatures[j])), j) for j in candidates), default=None)
        if best and best[0] >= threshold:
            found.append(Contamination(k, best[1], round(best[0], 3)))
    return found
