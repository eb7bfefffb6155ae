"""Distributed corpus encoding: Ray Data ``map_batches`` over encoder actors.

``hybridsearch index CORPUS --index DIR --ray auto|ADDRESS`` runs the command's own reading,
passage splitting and resume rules (skip unchanged passages, update changed ones, delete stale
ones) in the driver, in a stream: the driver holds one *window* of commit blocks at a time
(``--commit-every`` passages each, ``--ray-window`` blocks), never the corpus. Each window is a
Ray Data job: one row per block, ``map_batches(_EncodeBlocks, batch_size=1)`` on an actor pool
(one actor per GPU when the cluster has GPUs, ``num_gpus=1`` each; otherwise one per CPU), and
each actor encodes a block with the same ``encode_arrays`` call that ``HybridIndex.upsert``
makes in a single process. The driver commits the blocks in corpus order with
``upsert(block, encoded=...)``, so the index is the one the single-process command writes,
element-wise, block for block.

A dead encoder actor: Ray Data restarts it and retries its block (its pool runs with
``max_restarts=-1``, ``max_task_retries=-1``). The driver checks that every block comes back
exactly once with exactly its ids, in its order, before committing it (a missing or doubled
block is an error, not a silent loss or duplicate). An interrupted run resumes like the
single-process one: committed blocks are skipped as unchanged.

Costs: every window starts a fresh actor pool, so the model loads once per window per actor
(choose ``--ray-window`` so a window's encoding dwarfs a model load); blocks travel as ``.npz``
bytes (no pickles).
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


def actor_model(encoder) -> str:
    """What encoder actors load: the model's local folder when the driver has one (a cluster
    whose nodes share that path, or one machine), else its name (resolved on each node)."""
    return str(encoder.spec.path)


def ray_writer(index, args):
    """The ``index`` command's writer with encoding on Ray (``--ray``): the same reading,
    splitting, resume rules and commit blocks; blocks are encoded a window at a time by a Ray
    Data actor pool and committed in order."""
    from ..cli import _Writer
    from .cluster import connect

    class _RayWriter(_Writer):
        def __init__(self, index, args):
            super().__init__(index, args)
            connect(args.ray)
            found, gpus = cluster_actors()
            self.actors = args.ray_actors or found
            self.gpus = gpus
            self.window_blocks = args.ray_window or 16 * self.actors
            self.window: list[list[dict]] = []
            self.model = actor_model(index.encoder)

        def flush(self, final: bool) -> None:
            n = self.args.commit_every
            while len(self.pending) >= n or (final and self.pending):
                chunk, self.pending = self.pending[:n], self.pending[n:]
                self.window.append(chunk)
            if self.window and (final or len(self.window) >= self.window_blocks):
                self._run_window()
            if self.stale and not self.window:  # after the upserts queued before them, as in one process
                self.index.delete(self.stale)
                self.commits += 1
                self.deleted += len(self.stale)
                self.stale = []

        def _run_window(self) -> None:
            blocks = [([d["id"] for d in chunk], [d["text"] for d in chunk]) for chunk in self.window]
            for b, enc in encode_blocks(blocks, self.model, actors=self.actors, gpus=self.gpus,
                                        batch_size=self.args.batch_size):
                chunk = self.window[b]
                self.index.upsert(chunk, encoded=enc)
                self.commits += 1
                self.bar.update(len(chunk))
            self.window = []

    return _RayWriter(index, args)
