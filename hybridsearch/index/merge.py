"""Which segments to merge: a tiered (logarithmic) policy over *adjacent* segments.

Every commit adds one segment. Left alone, a corpus added 1,000 documents at a time becomes
thousands of segments, each visited on every query. After each commit the writer asks
:func:`plan_merges` for merges and runs them, one atomic generation each, until none is left.

The policy, in the spirit of Lucene's merge policies:

* A segment's *tier* is ``floor(log_F(max(live, floor) / floor))`` where ``live`` is its count of
  live (not deleted) documents, ``F`` the merge factor (default 10) and ``floor`` the smallest
  size worth distinguishing (default 1,000, the CLI's commit size). Segments below ``floor``
  are all tier 0.
* ``F`` adjacent segments of one tier merge into one segment of the next tier; the oldest such
  run merges first. Only adjacent segments merge, because a segment holds an ordered, disjoint
  range of docnos (``docs/ARCHITECTURE.md``): merging neighbours keeps every docno, so BM25,
  deletion lists and running searches are untouched by a merge.
* A segment whose deleted share exceeds ``max_deleted`` (default 0.5) is rewritten alone, which
  drops its deleted rows.
* No merge produces more than ``max_docs`` live documents (default 2**27): past that size, a
  tier simply stops merging.

So ``n`` documents added in equal commits of ``c`` end with at most ``(F - 1)`` segments per
tier, about ``(F - 1) * log_F(n / c)`` in the worst case and usually far fewer (1M documents in
commits of 1,000: between 1 and 27). Each document is rewritten about ``log_F(n / c)`` times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MERGE_FACTOR = 10
TIER_FLOOR = 1000
MAX_DELETED = 0.5
MAX_MERGED_DOCS = 1 << 27


@dataclass(frozen=True)
class MergePolicy:
    """Knobs of :func:`plan_merges`; ``HybridIndex(..., merge_policy=MergePolicy(...))``."""

    factor: int = MERGE_FACTOR
    floor: int = TIER_FLOOR
    max_deleted: float = MAX_DELETED
    max_docs: int = MAX_MERGED_DOCS

    def __post_init__(self):
        if not isinstance(self.factor, int) or isinstance(self.factor, bool) or self.factor < 2:
            raise ValueError(f"merge factor must be an integer >= 2, got {self.factor!r}")
        if not isinstance(self.floor, int) or isinstance(self.floor, bool) or self.floor < 1:
            raise ValueError(f"merge floor must be a positive integer, got {self.floor!r}")
        if not 0.0 < float(self.max_deleted) <= 1.0:
            raise ValueError(f"max_deleted must be in (0, 1], got {self.max_deleted!r}")
        if not isinstance(self.max_docs, int) or self.max_docs < 1:
            raise ValueError(f"max_docs must be a positive integer, got {self.max_docs!r}")

    def tier(self, live: int) -> int:
        return int(math.floor(math.log(max(live, self.floor) / self.floor, self.factor) + 1e-9))


NO_MERGES = None  # HybridIndex(..., merge_policy=None): never merge on commit


def plan_merges(live: np.ndarray, stored: np.ndarray, policy: MergePolicy = MergePolicy()
                ) -> tuple[int, int] | None:
    """The next merge for segments with ``live`` live and ``stored`` stored rows (in docno
    order), as a half-open range ``(start, end)`` of segment positions, or None when nothing
    needs merging. Call again after each merge (tiers cascade)."""
    live = np.asarray(live, dtype=np.int64)
    stored = np.asarray(stored, dtype=np.int64)
    n = len(live)
    tiers = [policy.tier(int(x)) for x in live]
    i = 0
    while i < n:
        j = i
        while j < n and tiers[j] == tiers[i]:
            j += 1
        # [i, j) is a run of one tier: merge its first `factor` members if they are small enough.
        if j - i >= policy.factor and int(live[i:i + policy.factor].sum()) <= policy.max_docs:
            return i, i + policy.factor
        i = j
    for s in range(n):
        if stored[s] and (stored[s] - live[s]) > policy.max_deleted * stored[s]:
            return s, s + 1
    return None
