"""Connect a study's driver to Ray: an explicit address, the cluster already on this node, or a local Ray.

Why: ``ray.init(num_cpus=...)`` raises ``ValueError`` whenever Ray decides on its own to join an
existing cluster, which it does when a head runs on this node (what ``ray up`` leaves) and also
when a head died without ``ray stop`` and left its address file behind. So the driver decides
first, explicitly, and never passes resources when it joins:

- ``--address`` / ``RAY_ADDRESS`` given: join it (``local`` forces a new local Ray);
- else Ray's current-cluster file names a GCS that answers: join that cluster;
- else (no file, or a stale one): start a local Ray with ``address="local"``.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """Where the driver connects: ``address`` as ``ray.init`` takes it, and why (one line)."""

    address: str
    reason: str

    @property
    def joins(self) -> bool:
        return self.address != "local"


def ray_temp_dir() -> Path:
    """Ray's temp root, by Ray's own rule: ``$RAY_TMPDIR``, else ``$TMPDIR``, else ``/tmp``; then ``ray``.

    ``ray start --head`` writes its address file here; the test with a real head checks that
    this rule still matches the installed Ray.
    """
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(base) / "ray"


def address_file() -> Path:
    return ray_temp_dir() / "ray_current_cluster"


def gcs_answers(address: str, timeout: float = 2.0) -> bool:
    """True when something accepts TCP connections at ``host:port`` (the head's GCS)."""
    host, _, port = address.strip().rpartition(":")
    if not host or not port.isdigit():
        return False
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def resolve(address: str | None) -> Target:
    """Decide where to connect, without starting anything."""
    if address:
        return Target(address, "--address/RAY_ADDRESS")
    file = address_file()
    recorded = file.read_text().strip() if file.is_file() else ""
    if not recorded:
        return Target("local", "no Ray cluster on this node")
    if gcs_answers(recorded):
        return Target(recorded, f"the Ray cluster running on this node (from {file})")
    return Target("local", f"stale address file {file} names {recorded}, which does not answer "
                           "(a head that died without `ray stop`)")


def init(address: str | None, num_cpus: int | None = None, **kwargs: Any) -> Target:
    """``ray.init`` for a study driver; resources (``num_cpus``) only when starting a local Ray."""
    import ray

    target = resolve(address)
    if target.joins:
        log.info("joining the Ray cluster at %s (%s)", target.address, target.reason)
        ray.init(address=target.address, **kwargs)
    else:
        (log.warning if "stale" in target.reason else log.info)("starting a local Ray: %s", target.reason)
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
    return target


def node_hosts() -> set[str]:
    """IP addresses of the alive nodes of the connected cluster (one per machine)."""
    import ray

    return {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
