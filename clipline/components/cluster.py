"""Joining a Ray cluster: the one place that reads ``RAY_ADDRESS`` (ingest and train both use it)."""

from __future__ import annotations

import os


def ray_address() -> str | None:
    """``RAY_ADDRESS`` (None when unset). Raises ValueError for a Ray Client address (``ray://``):
    clipline's driver runs on a node of the cluster instead (README, "Ray")."""
    address = os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith("ray://"):
        raise ValueError(
            f"RAY_ADDRESS={address} is a Ray Client address, which clipline does not support: run "
            "clipline on a node of the cluster (the head, for example) with RAY_ADDRESS=auto or "
            "<head-ip>:6379, as the README's Ray section shows"
        )
    return address


def connect_ray() -> None:
    """Join ``RAY_ADDRESS`` when set, else start (or reuse) a local Ray."""
    import ray

    address = ray_address()  # checked even when connected: the same error wherever it is read
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)


def alive_nodes() -> int:
    """How many nodes of the Ray cluster are up (joining or starting Ray first)."""
    import ray

    connect_ray()
    return sum(1 for n in ray.nodes() if n.get("Alive"))
