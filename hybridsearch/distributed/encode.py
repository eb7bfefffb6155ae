"""Distributed corpus encoding on Ray: encoder actors, one commit block per call.

``hybridsearch index CORPUS --index DIR --ray auto|ADDRESS`` runs the command's own reading,
passage splitting and resume rules (skip unchanged passages, update changed ones, delete stale
ones) in the driver, in a stream, and never holds the corpus: commit blocks (``--commit-every``
passages each) go to one :class:`EncoderPool` for the whole run, at most ``--ray-window`` blocks
in flight (default 4 per actor: all the driver holds). The actors start once and load the model
once (one per GPU when the cluster has GPUs, ``num_gpus=1`` each; otherwise one per CPU); each
encodes a block with the same ``encode_arrays`` call that ``HybridIndex.upsert`` makes in a
single process. The driver commits the blocks in corpus order with ``upsert(block,
encoded=...)``, so the index is the one the single-process command writes, element-wise, block
for block; the command's progress bar covers the whole run.

A dead encoder actor: Ray restarts it and retries its calls (``max_restarts=-1``,
``max_task_retries=-1``). The driver checks that every block comes back with exactly its ids,
in its order, once, before committing it (anything else is an error, never a silent loss or
duplicate). An interrupted run resumes like the single-process one: committed blocks are
skipped as unchanged. Blocks travel as ``.npz`` bytes (no pickles).

:func:`encode_blocks` is the same encoding as one Ray Data ``map_batches`` job over a list of
blocks (``ActorPoolStrategy``; what each window of earlier versions ran, with a fresh actor pool
and model load per window).
"""

from __future__ import annotations

import io
import os

import numpy as np
import scipy.sparse as sp

from ..representations import Encoded


def pack(enc: Encoded) -> bytes:
    """An Encoded as ``.npz`` bytes (``allow_pickle=False`` on both ends)."""
    arrays = {"n_tokens": np.asarray(enc.n_tokens, np.int64)}
    if enc.dense is not None:
        arrays["dense"] = enc.dense
    if enc.sparse is not None:
        s = enc.sparse
        arrays.update(sp_indptr=s.indptr, sp_indices=s.indices, sp_data=s.data,
                      sp_shape=np.asarray(s.shape, np.int64))
    if enc.colbert is not None:
        arrays.update(colbert=enc.colbert, colbert_offsets=enc.colbert_offsets)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack(data: bytes) -> Encoded:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}
    sparse = None
    if "sp_data" in a:
        sparse = sp.csr_matrix((a["sp_data"], a["sp_indices"], a["sp_indptr"]), shape=tuple(a["sp_shape"]))
    return Encoded(dense=a.get("dense"), sparse=sparse, colbert=a.get("colbert"),
                   colbert_offsets=a.get("colbert_offsets"), n_tokens=a["n_tokens"])


class _EncodeBlocks:
    """Ray Data actor: loads the encoder once, encodes one commit block per call."""

    def __init__(self, model: str, device: str, batch_size: int | None, threads: int | None):
        import torch

        from ..encode import BGEM3Encoder

        if threads:
            torch.set_num_threads(threads)
        self.encoder = BGEM3Encoder(model, device=device)
        self.batch_size = batch_size

    def encode(self, block: int, ids: list[str], texts: list[str]) -> tuple[int, list[str], bytes, int]:
        """One commit block: ``(block, ids, .npz payload, pid)`` (the run-long pool's call)."""
        out = self({"block": [block], "ids": [ids], "texts": [texts]})
        return out["block"][0], out["ids"][0], out["payload"][0], out["pid"][0]

    def ready(self) -> int:
        return os.getpid()

    def __call__(self, batch: dict) -> dict:
        spec = self.encoder.spec
        out = {"block": [], "ids": [], "payload": [], "pid": []}
        for block, ids, texts in zip(batch["block"], batch["ids"], batch["texts"]):
            texts = [str(t) for t in texts]
            enc = self.encoder.encode_arrays(texts, kind="passage", batch_size=self.batch_size,
                                             sparse=spec.has_sparse, colbert=spec.has_colbert,
                                             show_progress=False)
            out["block"].append(int(block))
            out["ids"].append(list(ids))
            out["payload"].append(pack(enc))
            out["pid"].append(os.getpid())
        return out


def cluster_actors(cpus_per_actor: float = 1.0) -> tuple[int, bool]:
    """``(actors, use_gpus)``: one actor per GPU of the cluster if it has any, else one per
    ``cpus_per_actor`` CPUs (at least one)."""
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if gpus:
        return gpus, True
    return max(1, int(res.get("CPU", 1) // cpus_per_actor)), False


def encode_blocks(blocks: list[tuple[list[str], list[str]]], model: str, *, actors: int, gpus: bool,
                  batch_size: int | None = None, cpus_per_actor: float = 1.0, threads: int | None = None):
    """Encode ``blocks`` (``(ids, texts)`` each) on a Ray Data actor pool; yields
    ``(block number, Encoded)`` in block order, each block exactly once with its own ids
    (checked)."""
    import logging

    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # one bar (the caller's) and no per-job lines
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    items = [{"block": b, "ids": list(ids), "texts": list(texts)} for b, (ids, texts) in enumerate(blocks)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        _EncodeBlocks, batch_size=1, batch_format="numpy",
        compute=ActorPoolStrategy(size=max(1, min(actors, len(items)))),
        fn_constructor_kwargs={"model": model, "device": "cuda" if gpus else "cpu",
                               "batch_size": batch_size, "threads": threads},
        num_gpus=1 if gpus else 0, num_cpus=0 if gpus else cpus_per_actor,
    )
    waiting: dict[int, Encoded] = {}
    nxt = 0
    seen = set()
    for row in ds.iter_rows():
        b = int(row["block"])
        if b in seen or not 0 <= b < len(blocks):
            raise RuntimeError(f"encoding returned block {b} twice or out of range: refusing to commit it")
        seen.add(b)
        if [str(i) for i in row["ids"]] != list(blocks[b][0]):
            raise RuntimeError(f"encoding returned other ids for block {b}: refusing to commit it")
        enc = unpack(row["payload"])
        if len(enc) != len(blocks[b][0]):
            raise RuntimeError(f"block {b}: {len(enc)} encoded rows for {len(blocks[b][0])} passages")
        waiting[b] = enc
        while nxt in waiting:
            yield nxt, waiting.pop(nxt)
            nxt += 1
    if nxt != len(blocks):
        raise RuntimeError(f"encoding returned {nxt} of {len(blocks)} blocks: nothing after block {nxt} committed")


class EncoderPool:
    """Encoder actors that live for a whole run (one model load each, not one per window):
    ``num_gpus=1`` each where the cluster has GPUs, else ``cpus_per_actor`` CPUs; nothing pins
    a node. Blocks go to the least busy actor; a killed actor is restarted by Ray and its calls
    retried (``max_restarts=-1``, ``max_task_retries=-1``), and every result is checked against
    the block it answers (:meth:`result`), so a block is committed exactly once or the run stops."""

    def __init__(self, model: str, *, actors: int, gpus: bool, batch_size: int | None = None,
                 cpus_per_actor: float = 1.0, threads: int | None = None):
        import ray

        Actor = ray.remote(_EncodeBlocks).options(
            max_restarts=-1, max_task_retries=-1, num_gpus=1 if gpus else 0,
            num_cpus=0 if gpus else cpus_per_actor)
        self.actors = [Actor.remote(model, "cuda" if gpus else "cpu", batch_size, threads)
                       for _ in range(max(1, actors))]
        self.busy = [0] * len(self.actors)

    def submit(self, block: int, ids: list[str], texts: list[str]):
        """Start encoding one block; returns a handle for :meth:`result`."""
        a = min(range(len(self.actors)), key=self.busy.__getitem__)
        self.busy[a] += 1
        return a, block, list(ids), self.actors[a].encode.remote(block, list(ids), list(texts))

    def result(self, handle) -> Encoded:
        """The block's encoding (waits), checked: its block number, its ids in order, one row each."""
        import ray

        a, block, ids, ref = handle
        try:
            b, got_ids, payload, _ = ray.get(ref)
        finally:
            self.busy[a] -= 1
        if int(b) != block or [str(i) for i in got_ids] != ids:
            raise RuntimeError(f"encoding returned another block for block {block}: refusing to commit it")
        enc = unpack(payload)
        if len(enc) != len(ids):
            raise RuntimeError(f"block {block}: {len(enc)} encoded rows for {len(ids)} passages")
        return enc

    def encode_all(self, blocks, window: int):
        """``(block number, Encoded)`` of ``blocks`` (an iterable of ``(ids, texts)``) in order,
        at most ``window`` blocks in flight."""
        from collections import deque

        flight: deque = deque()
        for b, (ids, texts) in enumerate(blocks):
            flight.append(self.submit(b, ids, texts))
            if len(flight) >= window:
                h = flight.popleft()
                yield h[1], self.result(h)
        while flight:
            h = flight.popleft()
            yield h[1], self.result(h)

    def pids(self) -> list[int]:
        import ray

        return ray.get([a.ready.remote() for a in self.actors])

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []


def actor_model(encoder) -> str:
    """What encoder actors load: the model's local folder when the driver has one (a cluster
    whose nodes share that path, or one machine), else its name (resolved on each node)."""
    return str(encoder.spec.path)


def ray_writer(index, args):
    """The ``index`` command's writer with encoding on Ray (``--ray``): the same reading,
    splitting, resume rules and commit blocks; blocks are encoded by one :class:`EncoderPool`
    for the whole run (at most ``--ray-window`` blocks in flight) and committed in order."""
    from collections import deque

    from ..cli import _Writer
    from .cluster import connect

    class _RayWriter(_Writer):
        def __init__(self, index, args):
            super().__init__(index, args)
            connect(args.ray)
            found, gpus = cluster_actors()
            self.actors = args.ray_actors or found
            self.gpus = gpus
            self.window_blocks = args.ray_window or 4 * self.actors
            self.flight: deque = deque()  # (handle, chunk) in corpus order
            self.blocks = 0
            self.pool = None

        def _commit_next(self) -> None:
            handle, chunk = self.flight.popleft()
            enc = self.pool.result(handle)
            self.index.upsert(chunk, encoded=enc)
            self.commits += 1
            self.bar.update(len(chunk))

        def flush(self, final: bool) -> None:
            n = self.args.commit_every
            while len(self.pending) >= n or (final and self.pending):
                chunk, self.pending = self.pending[:n], self.pending[n:]
                if self.pool is None:  # started at the first block: a run with nothing to encode starts none
                    self.pool = EncoderPool(actor_model(self.index.encoder), actors=self.actors, gpus=self.gpus,
                                            batch_size=self.args.batch_size)
                self.flight.append((self.pool.submit(self.blocks, [d["id"] for d in chunk],
                                                     [d["text"] for d in chunk]), chunk))
                self.blocks += 1
                while len(self.flight) >= self.window_blocks:  # the driver holds at most a window
                    self._commit_next()
            if final or self.stale:  # stale ids go after the upserts queued before them, as in one process
                while self.flight:
                    self._commit_next()
            if self.stale:
                self.index.delete(self.stale)
                self.commits += 1
                self.deleted += len(self.stale)
                self.stale = []
            if final and self.pool is not None:
                self.pool.close()
                self.pool = None

    return _RayWriter(index, args)
