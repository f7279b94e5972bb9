"""The response cache: an HTTP worker's answers to uploads it has seen, kept by what decides
them, so a repeated upload skips decode and model.

The key is (the upload's sha256, the model's name and version, the options that shape the
answer): a load of a new version misses every entry of the old one, and a swap clears the
cache besides (``ResponseCache.served``), so no answer outlives its version. What is kept is
the model's outcome and the image's facts, never a response: each hit's answer is built for its
own request (its id, its timing), so a hit cannot carry another request's id, and attention
asked for one way is never answered for another (the mode is in the key). Least recently used
entries leave first, within ``VIT_CACHE_BYTES`` (each entry's arrays, heatmap and a fixed
overhead); one cache per HTTP worker process.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from ..metrics import Metrics
from ..model.engine import Outcome
from .options import Options

__all__ = ["CacheKey", "Cached", "Facts", "ResponseCache", "cache_key"]

# What an entry costs beyond its arrays and heatmap: the key, the facts, the objects.
ENTRY_OVERHEAD = 600

CacheKey = tuple[str, str, str, int, str, bool]


@dataclass(frozen=True)
class Facts:
    """An image's facts as an answer reports them (the pixels are not kept)."""

    width: int
    height: int
    format: str
    mode: str
    sha256: str


@dataclass(frozen=True)
class Cached:
    """One image's answer, as the model and the heatmap painter gave it."""

    facts: Facts
    outcome: Outcome
    heatmap_png: str | None

    @property
    def nbytes(self) -> int:
        out = self.outcome
        attention = 0 if out.attention is None else out.attention.nbytes
        return out.probs.nbytes + attention + len(self.heatmap_png or "") + ENTRY_OVERHEAD


def cache_key(data: bytes, name: str, version: str, options: Options) -> CacheKey:
    """The key of an upload's answer under a model version and the request's options."""
    digest = hashlib.sha256(data).hexdigest()
    return digest, name, version, options.top_k, options.attention, options.heatmap


class ResponseCache:
    """Least recently used answers within ``budget`` bytes (0: off, nothing kept).

    Args:
        budget: the bytes entries may take in all.
        metrics: the hit/miss counter and the bytes gauge.
    """

    def __init__(self, budget: int, metrics: Metrics) -> None:
        self.budget = budget
        self._metrics = metrics
        self._entries: OrderedDict[CacheKey, Cached] = OrderedDict()
        self._bytes = 0
        self._versions: tuple[str, frozenset[str]] | None = None
        self._hit = metrics.cache_lookups.labels(result="hit")
        self._miss = metrics.cache_lookups.labels(result="miss")

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def served(self, name: str, versions: set[str]) -> None:
        """The model versions now serving: the entries of any other one leave."""
        now = (name, frozenset(versions))
        if self._versions == now:
            return
        self._versions = now
        for key in [k for k in self._entries if k[1] != name or k[2] not in versions]:
            self._bytes -= self._entries.pop(key).nbytes
        self._metrics.cache_bytes.set(self._bytes)

    def get(self, key: CacheKey) -> Cached | None:
        """The entry for ``key`` (now the most recently used), counted as a hit or a miss."""
        entry = self._entries.get(key)
        if entry is None:
            self._miss.inc()
            return None
        self._entries.move_to_end(key)
        self._hit.inc()
        return entry

    def put(self, key: CacheKey, entry: Cached) -> None:
        """Keep ``entry``, the least recently used ones leaving to make room; one larger than
        the whole budget is not kept."""
        size = entry.nbytes
        if size > self.budget:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes
        while self._entries and self._bytes + size > self.budget:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes
        self._entries[key] = entry
        self._bytes += size
        self._metrics.cache_bytes.set(self._bytes)
