"""Keys and values of prompt prefixes seen before: a repeated prefix is not prefilled again.

Chat applications send the same system prompt (instructions, a policy, retrieved documents) with
every request. Its keys and values depend on its tokens and on the adapter (LoRA changes the k
and v projections), nothing else, so they can be kept and copied into the next request's slot.

Prompts are cut into blocks of ``block`` tokens. Block *i* is identified by a chained digest,
``d_i = sha256(d_{i-1} ‖ tokens of block i)``, so a block stands for the whole prefix that ends
with it, and by a *scope*: the tenant and the adapter's weights. A tenant never reuses another
tenant's blocks, so the time to its first token says nothing about what other tenants sent.

Least recently used blocks go first when the byte budget is full. A lookup or insert touches a
prefix's blocks from the last to the first, so a prefix loses its tail before its head (a block is
only useful while every block before it is still there).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

DEFAULT_BLOCK = 64


@dataclass
class PrefixStats:
    prompt_tokens: int = 0  # tokens of the prompts looked up
    hit_tokens: int = 0  # of which came from the cache
    blocks: int = 0
    bytes: int = 0


class PrefixCache:
    """Blocks of prompt keys and values, in memory, within ``capacity_bytes``.

    Args:
        capacity_bytes: most bytes of keys and values held (blocks are evicted beyond it).
        block: tokens per block; only whole blocks are cached.
    """

    def __init__(self, capacity_bytes: int, block: int = DEFAULT_BLOCK) -> None:
        if capacity_bytes < 0 or block < 1:
            raise ValueError(f"capacity_bytes must be >= 0 and block >= 1, got {capacity_bytes} and {block}")
        self.capacity = capacity_bytes
        self.block = block
        self._blocks: OrderedDict[tuple[str, bytes], torch.Tensor] = OrderedDict()
        self._stats = PrefixStats()

    def _digests(self, prompt: Sequence[int], count: int) -> list[bytes]:
        digests, previous = [], b""
        for i in range(count):
            chunk = array("q", prompt[i * self.block : (i + 1) * self.block]).tobytes()
            previous = hashlib.sha256(previous + chunk).digest()
            digests.append(previous)
        return digests

    def lookup(self, scope: str, prompt: Sequence[int]) -> list[torch.Tensor]:
        """The cached blocks of ``prompt``'s longest cached prefix, in order.

        At least the prompt's last token is left out: its logits are what prefill is for.
        """
        usable = (len(prompt) - 1) // self.block
        found: list[tuple[tuple[str, bytes], torch.Tensor]] = []
        for digest in self._digests(prompt, usable):
            key = (scope, digest)
            kv = self._blocks.get(key)
            if kv is None:
                break
            found.append((key, kv))
        for key, _ in reversed(found):
            self._blocks.move_to_end(key)
        self._stats.prompt_tokens += len(prompt)
        self._stats.hit_tokens += len(found) * self.block
        return [kv for _, kv in found]

    def insert(self, scope: str, prompt: Sequence[int], read: Callable[[int, int], torch.Tensor]) -> None:
        """Keep ``prompt``'s whole blocks that are not cached yet (its slot holds all of them).

        ``read(start, end)`` returns the keys and values of positions ``start..end-1`` (a copy).
        Room is made before each block is added, least recently used first, but never by evicting
        this prompt's own blocks: a prompt longer than the budget keeps its head, which is what
        later requests share.
        """
        if self.capacity == 0:
            return
        keys = [(scope, d) for d in self._digests(prompt, len(prompt) // self.block)]
        mine = set(keys)
        try:
            for i, key in enumerate(keys):
                if key in self._blocks:
                    continue
                kv = read(i * self.block, (i + 1) * self.block)
                if kv.nbytes > self.capacity:
                    return
                while self._stats.bytes + kv.nbytes > self.capacity:
                    oldest = next(iter(self._blocks))
                    if oldest in mine:
                        return
                    self._stats.bytes -= self._blocks.pop(oldest).nbytes
                self._blocks[key] = kv
                self._stats.bytes += kv.nbytes
        finally:
            for key in reversed(keys):
                if key in self._blocks:
                    self._blocks.move_to_end(key)

    def stats(self) -> PrefixStats:
        return replace(self._stats, blocks=len(self._blocks))
