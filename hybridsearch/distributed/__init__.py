"""Past one machine, on Ray (``pip install "hybridsearch[ray]"``).

* :mod:`.encode`: corpus encoding on a pool of Ray encoder actors that lives for the whole run
  (or one Ray Data ``map_batches`` job), committed into an index exactly as the single-process
  ``hybridsearch index`` would (``hybridsearch index CORPUS --index DIR --ray auto|ADDRESS``).
* :mod:`.sharded`: :class:`ShardedIndex`, N shard actors (each a full
  :class:`~hybridsearch.HybridIndex` in its own folder, optionally replicated) behind one
  coordinator that fuses globally, with global BM25 statistics and one ColBERT codebook.
* :mod:`.cluster`: attaching to a cluster (``ray.init(address=...)``) and a loopback-only local
  cluster for tests and benchmarks.

Nothing in the core imports this package (or Ray).
"""

from __future__ import annotations

__all__ = ["ShardedIndex", "ShardUnavailableError", "SearchResult", "connect", "local_cluster"]


def __getattr__(name):
    if name in ("ShardedIndex", "ShardUnavailableError", "SearchResult"):
        from . import sharded
        return getattr(sharded, name)
    if name in ("connect", "local_cluster"):
        from . import cluster
        return getattr(cluster, name)
    raise AttributeError(name)
