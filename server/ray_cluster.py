"""Joining a Ray cluster: the one place the optional ``ray`` dependency is imported first.

``--ray ADDRESS|auto|local``: ``auto`` joins the cluster ``ray start --head`` runs
on this machine (or ``$RAY_ADDRESS``), ``HOST:PORT`` joins that head's GCS,
``local`` starts a private one-machine cluster for this process (handy to try
the cluster path; it does not read ``/tmp/ray/ray_current_cluster``, whose
leftovers break ``auto``). Without ray installed, :func:`require_ray` says how to
get it. Token auth (``RAY_AUTH_MODE=token``, the token in ``$RAY_AUTH_TOKEN`` or
``~/.ray/auth_token``) is Ray's own: export the same on the head, every worker
and this process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from tracker.errors import TrackerError

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e .[ray]"


class ClusterError(TrackerError):
    """Ray is missing, the cluster cannot be joined, or it lacks what a worker asks for."""


def require_ray() -> Any:
    """The ``ray`` module, or a ClusterError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ClusterError(f"--ray needs Ray, an optional extra: {INSTALL_HINT}") from None
    return ray


def connect(address: str, namespace: str | None = None) -> Any:
    """Join (or, with ``local``, start) the cluster at ``address``; returns ``ray``. Idempotent.

    ``namespace``: where named actors are looked up (``serve --ray``'s hosts and directory)."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    if not address:
        raise ClusterError("--ray: give the head's HOST:PORT, auto (the cluster on this machine) or local")
    kwargs: dict[str, Any] = {"include_dashboard": False} if address == "local" else {}
    if namespace:
        kwargs["namespace"] = namespace
    try:
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING, **kwargs)
    except ConnectionError as e:
        raise ClusterError(
            f"--ray {address}: cannot join the cluster ({e}); start one with `ray start --head` "
            "(and RAY_AUTH_MODE=token exported on every node and here), or use --ray local"
        ) from None
    logger.info("joined the Ray cluster at %s: %s", address, _resources_line(ray.cluster_resources()))
    return ray


def _resources_line(resources: dict[str, float]) -> str:
    keep = {k: v for k, v in resources.items() if not k.startswith("node:") and "memory" not in k}
    return ", ".join(f"{v:g} {k}" for k, v in sorted(keep.items())) or "no resources"


@dataclass(frozen=True)
class WorkerShape:
    """What one worker actor asks Ray for: CPUs, GPUs (whole or fractional), custom resources."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: tuple[tuple[str, float], ...] = ()

    def options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            out["resources"] = dict(self.resources)
        return out

    def fits(self, total: dict[str, float]) -> int:
        """How many such workers the cluster's ``total`` resources hold at most."""
        asked = {"CPU": self.num_cpus, "GPU": self.num_gpus, **dict(self.resources)}
        counts = [int(total.get(k, 0.0) // v) for k, v in asked.items() if v > 0]
        return min(counts) if counts else 0

    def describe(self) -> str:
        parts = [f"{self.num_cpus:g} CPU"] + ([f"{self.num_gpus:g} GPU"] if self.num_gpus else [])
        return ", ".join(parts + [f"{v:g} {k}" for k, v in self.resources])


def default_shape(total: dict[str, float], num_cpus: float | None, num_gpus: float | None, resources: dict[str, float]) -> WorkerShape:
    """One GPU per worker where the cluster has GPUs, else one CPU; flags override either."""
    gpus = num_gpus if num_gpus is not None else (1.0 if total.get("GPU", 0.0) >= 1 else 0.0)
    cpus = num_cpus if num_cpus is not None else 1.0
    return WorkerShape(cpus, gpus, tuple(sorted(resources.items())))


def torch_threads_for_actor() -> int:
    """The CPUs Ray gave this actor (Ray sets ``OMP_NUM_THREADS`` from them), at least 1."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        return 1


__all__ = ["ClusterError", "INSTALL_HINT", "WorkerShape", "connect", "default_shape", "require_ray"]
