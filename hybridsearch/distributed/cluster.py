"""Attaching to a Ray cluster, and a loopback-only local cluster for tests and benchmarks."""

from __future__ import annotations

import os
from contextlib import contextmanager

# Ray resolves "127.0.0.1" to the machine's outward address when it connects (and the nodes
# it starts then advertise that address). With this set before Ray is imported, a local
# cluster stays on the loopback interface; `local_cluster` sets it, `connect` does not.
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _stay_on_loopback() -> None:
    """Keep Ray's address resolution on 127.0.0.1: the environment variable for the processes
    Ray starts, and the constant for this one (read when Ray was imported)."""
    os.environ[_LOOPBACK_ENV] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def connect(address: str | None = "auto", **init_kwargs) -> None:
    """``ray.init(address=...)`` unless Ray is already initialised in this process.

    ``address``: ``"auto"`` attaches to the cluster this machine belongs to (``RAY_ADDRESS`` or a
    running local one); if there is none, a single-node Ray is started in this process (bound to
    127.0.0.1, no dashboard). Anything else (``"ray://head:10001"``, ``"10.0.0.5:6379"``) is
    passed to ``ray.init`` as is, so the cluster must be reachable.
    """
    import ray

    if ray.is_initialized():
        return
    kwargs = {"ignore_reinit_error": True, "log_to_driver": False, **init_kwargs}
    if address in (None, "auto", "local"):
        try:
            ray.init(address="auto", **kwargs)
            return
        except ConnectionError:
            pass
        _stay_on_loopback()
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)
        return
    ray.init(address=address, **kwargs)


@contextmanager
def local_cluster(nodes: int = 3, cpus_per_node: int = 1, *, object_store_mb: int = 150, connect: bool = True):
    """A head plus ``nodes - 1`` worker nodes on 127.0.0.1 (``ray.cluster_utils.Cluster``: no
    ``ray start``, no dashboard, nothing bound beyond loopback); the driver connects to it.
    Shut down (every node process) on exit."""
    _stay_on_loopback()
    import ray
    from ray.cluster_utils import Cluster

    node = {"num_cpus": cpus_per_node, "node_ip_address": "127.0.0.1",
            "object_store_memory": object_store_mb << 20}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        if connect:
            ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        if connect:
            ray.shutdown()
        cluster.shutdown()
