"""Connect a study's driver to Ray: an explicit address, the cluster already on this node, or a local Ray.

Why this module and not ``ray.init()`` alone: ``ray.init(address=None)`` already joins the cluster
named by Ray's current-cluster file and otherwise starts a local Ray, but (Ray 2.60) it cannot
start a local Ray with resources *unless* it does not join (``ray.init(num_cpus=...)`` raises
``ValueError`` whenever it decides to join) and it trusts a stale file a head left when it died
without ``ray stop`` (the connection then fails instead of starting a local Ray). So the driver
decides first, with Ray's own rule for where that file is, and never passes resources when it joins:

- ``--address`` / ``RAY_ADDRESS`` given: join it (``local`` forces a new local Ray);
- else Ray's current-cluster file names a GCS that answers: join that cluster;
- else (no file, or a stale one): start a local Ray with ``address="local"``.

A head started with ``ray start --temp-dir DIR`` writes its file under DIR, where neither Ray's
``ray.init()`` nor this module looks: pass ``--address`` for such a head.
"""

from __future__ import annotations

import logging
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


def address_file() -> Path:
    """Ray's current-cluster file, by Ray's own rule (``$RAY_TMPDIR``, else ``$TMPDIR``, else /tmp; then
    ``ray/ray_current_cluster``). Private: Ray has no public function for it."""
    from ray._common.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


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
