"""What the Ray cluster can become, not only what is up now: the autoscaler's node types.

Why: on a fresh autoscaling cluster (``ray up cluster.yaml``, a KubeRay RayJob) the GPU workers
start at zero, so ``ray.cluster_resources()`` has no GPU until the autoscaler adds a node, and
it adds one only for demand that is waiting. A study therefore asks two questions before its
first trial:

- can any node, up now or of a node type the autoscaler may add, ever hold one trial
  (``{CPU: c, GPU: g}``)? No: exit 2 with one line (``StudyError``), before any compute;
- is one already up? No: request it from the autoscaler (``ray.autoscaler.sdk.request_resources``)
  and wait, printing a progress line (nodes requested / up, seconds waited) when those counts change,
  at least every ``PROGRESS_S``; ``--wait-for-nodes SECONDS`` bounds the wait (then exit 2).

The same node types answer "can this cluster span more than one machine?" (then checkpoints
need shared storage) and the default ``--gpus-per-trial``: ``DEFAULT_GPU_SHARE`` of a GPU per
trial where the cluster has or can add GPU nodes, else 0.

Where the node types come from, in order (Ray 2.60 has no public API that lists an
autoscaler's node types, see ``_types_from_gcs``):

1. ``$OODLAB_NODE_TYPES``: JSON ``{"name": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 8}}``
   (KubeRay: its autoscaler runs in a sidecar container reading the RayCluster from the
   Kubernetes API, so k8s/rayjob.yaml states its worker groups here; a test checks they agree);
2. the cluster config an autoscaler reported to the GCS (``ray._private.state``), when there is one;
3. the autoscaling config file of the autoscaler (monitor) process serving this cluster on this
   node, from its command line (``ray start --head --autoscaling-config=FILE``; ``ray up`` passes
   ``~/ray_bootstrap_config.yaml``).

None of them: the cluster has no autoscaler and is what is up now.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oodlab import stores
from oodlab.study import StudyError

log = logging.getLogger("oodlab")

# Default GPU share per trial where the cluster has or can add GPU nodes: two trials per GPU.
# The papers' models are small (paper 000's VAE has 328k parameters, 28x28 inputs), so one trial
# leaves most of a GPU idle; two per GPU roughly doubles the trials per GPU-hour without running
# out of memory on a 16-24 GB card. --gpus-per-trial 1 gives each trial a whole GPU.
DEFAULT_GPU_SHARE = 0.5
PROGRESS_S = 60.0  # while waiting for the autoscaler: a progress line when the counts change, else this often
POLL_S = 1.0
ENV_NODE_TYPES = "OODLAB_NODE_TYPES"


@dataclass(frozen=True)
class NodeType:
    """A kind of node the autoscaler may add (``max_workers`` > 0) or the head (``head``)."""

    name: str
    resources: dict[str, float]
    max_workers: int
    head: bool = False

    def fits(self, bundle: dict[str, float]) -> bool:
        return fits(self.resources, bundle)

    def describe(self) -> str:
        return f"{self.name} {fmt(self.resources)}" + ("" if self.head else f" (max {self.max_workers})")


@dataclass
class Cluster:
    """The connected cluster: alive nodes' total resources and the autoscaler's node types."""

    nodes: list[dict[str, float]]
    node_types: list[NodeType] = field(default_factory=list)
    source: str = ""  # where node_types came from; "" = no autoscaler known

    @property
    def autoscaling(self) -> bool:
        return any(t.max_workers > 0 and not t.head for t in self.node_types)

    def addable(self, bundle: dict[str, float]) -> list[NodeType]:
        """Node types the autoscaler may add that hold ``bundle``."""
        return [t for t in self.node_types if not t.head and t.max_workers > 0 and t.fits(bundle)]

    def up(self, bundle: dict[str, float]) -> int:
        """Alive nodes that hold ``bundle`` (whether or not it is free now)."""
        return sum(fits(n, bundle) for n in self.nodes)

    def has_gpus(self) -> list[str]:
        """Names of what brings GPUs: alive nodes with one, node types that have one."""
        names = [f"{sum(n.get('GPU', 0) > 0 for n in self.nodes)} node(s) up"] if any(
            n.get("GPU", 0) > 0 for n in self.nodes) else []
        return names + [t.name for t in self.node_types if not t.head and t.max_workers > 0
                        and t.resources.get("GPU", 0) > 0]

    def can_span_machines(self) -> bool:
        """More than one machine now, or an autoscaler that may add worker nodes."""
        return len({n.get("_host") for n in self.nodes}) > 1 or self.autoscaling


def fits(resources: dict[str, float], bundle: dict[str, float]) -> bool:
    return all(resources.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items() if v > 0)


def fmt(resources: dict[str, float]) -> str:
    hidden = ("_", "node:", "memory", "object_store_memory", "accelerator_type:")
    shown = {k: v for k, v in resources.items() if not k.startswith(hidden)}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


def bundle_of(args: argparse.Namespace) -> dict[str, float]:
    """One trial's resource request, as Tune asks for it (``tune.with_resources``)."""
    return {k: float(v) for k, v in (("CPU", args.cpus_per_trial), ("GPU", args.gpus_per_trial or 0)) if v}


# ---------------------------------------------------------------- reading the cluster


def alive_nodes() -> list[dict[str, float]]:
    import ray

    return [{**n.get("Resources", {}), "_host": n["NodeManagerAddress"]} for n in ray.nodes() if n.get("Alive")]


def _parse_types(config: dict[str, Any]) -> list[NodeType]:
    """Node types of an autoscaling config (``available_node_types``; Ray's cluster.yaml schema)."""
    head = config.get("head_node_type")
    overall = int(config.get("max_workers", 2**31))
    out = []
    for name, spec in (config.get("available_node_types") or {}).items():
        spec = spec or {}
        out.append(NodeType(name, {k: float(v) for k, v in (spec.get("resources") or {}).items()},
                            min(int(spec.get("max_workers", 0)), overall) if name != head else 0, name == head))
    return out


def _types_from_env() -> list[NodeType] | None:
    text = os.environ.get(ENV_NODE_TYPES, "").strip()
    return _types_from_env_text(text) if text else None


def _types_from_env_text(text: str) -> list[NodeType]:
    try:
        spec = json.loads(text)
        return [NodeType(name, {k: float(v) for k, v in t["resources"].items()}, int(t.get("max_workers", 0)))
                for name, t in spec.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise StudyError(f"${ENV_NODE_TYPES} is not valid node-type JSON ({type(e).__name__}: {e}); expected "
                         '{"name": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 8}}') from None


def _types_from_gcs() -> list[NodeType] | None:
    """The cluster config an autoscaler reported to the GCS (``ReportClusterConfig``).

    Private: Ray 2.60 has no public API for an autoscaler's node types (``ray.autoscaler.sdk``
    can only request resources; ``ray.autoscaler.v2.sdk.get_cluster_status`` reports nodes and
    pending launches, not what could be launched). ``ray._private.state`` reads what an
    autoscaler reported; the open-source autoscalers (v1, v2, KubeRay's) of Ray 2.60 report
    nothing there, so this is None for them and the config file below answers instead.
    """
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception as e:  # noqa: BLE001 - a private API: any failure means "not available"
        log.debug("no cluster config in the GCS: %s", e)
        return None
    if not config or not config.node_group_configs:
        return None
    return [NodeType(g.name, {k: float(v) for k, v in g.resources.items()},
                     g.max_count if g.max_count >= 0 else 2**31) for g in config.node_group_configs]


def autoscaler_config_file(gcs_address: str) -> Path | None:
    """The ``--autoscaling-config`` of the autoscaler process serving ``gcs_address`` on this node.

    Ray starts its autoscaler (``ray/autoscaler/_private/monitor.py``) with the head and passes it
    the file ``ray start --autoscaling-config`` got, and the cluster's ``--gcs-address``; Ray
    keeps the path nowhere else a driver can read.
    """
    port = gcs_address.rpartition(":")[2]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="ignore").split("\0")
        except OSError:
            continue
        if not any(a.endswith("monitor.py") for a in argv[:3]):
            continue
        flags = dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)
        if flags.get("--gcs-address", "").rpartition(":")[2] == port and flags.get("--autoscaling-config"):
            return Path(os.path.expanduser(flags["--autoscaling-config"]))
    return None


def _types_from_file(gcs_address: str) -> tuple[list[NodeType], str] | None:
    import yaml  # type: ignore[import-untyped]

    path = autoscaler_config_file(gcs_address)
    if path is None or not path.is_file():
        return None
    text = path.read_text()
    try:
        config = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError):
        return None
    return _parse_types(config or {}), str(path)


def read_cluster() -> Cluster:
    """The connected cluster: alive nodes and, when an autoscaler is known, its node types."""
    import ray

    nodes = alive_nodes()
    types = _types_from_env()
    if types is not None:
        return Cluster(nodes, types, f"${ENV_NODE_TYPES}")
    types = _types_from_gcs()
    if types:
        return Cluster(nodes, types, "the autoscaler's cluster config in the GCS")
    found = _types_from_file(ray.get_runtime_context().gcs_address)
    if found:
        return Cluster(nodes, found[0], found[1])
    return Cluster(nodes)


def pending_launches() -> int | None:
    """Nodes the autoscaler is launching now (requested, not yet up), from its status report.

    Private: the autoscaler (v1) publishes its summary only as JSON in the GCS's internal KV
    (what ``ray status`` reads); autoscaler v2 answers ``ray.autoscaler.v2.sdk.get_cluster_status``.
    """
    try:
        import ray
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        if raw:
            report = json.loads(raw).get("autoscaler_report") or {}
            if report:
                launching = sum((report.get("pending_launches") or {}).values())
                return int(launching + len(report.get("pending_nodes") or []))
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        return sum(getattr(r, "count", 1) for r in status.pending_launches) + len(status.pending_nodes)
    except Exception as e:  # noqa: BLE001 - a status line is not worth failing a study for
        log.debug("autoscaler status unavailable: %s", e)
        return None


# ---------------------------------------------------------------- the study's questions


def default_gpus(cluster: Cluster) -> tuple[float, str]:
    """``--gpus-per-trial`` when not given: ``DEFAULT_GPU_SHARE`` where GPUs are or can be, else 0."""
    gpu = cluster.has_gpus()
    if gpu:
        return DEFAULT_GPU_SHARE, f"the cluster has or can add GPU nodes: {', '.join(gpu)}"
    how = "and no autoscaler node type with one" if cluster.source else "and no autoscaler to add one"
    return 0.0, f"no GPU on this cluster {how}"


def check(args: argparse.Namespace, ray_root: str) -> Cluster:
    """Resolve ``args.gpus_per_trial``, refuse what can never run, wait for what the autoscaler may add.

    Raises ``StudyError`` (one line, exit 2) for a request no node can ever hold, node-local
    checkpoints on a cluster that spans (or may span) machines, and a ``--wait-for-nodes`` that ran out.
    """
    cluster = read_cluster()
    if args.gpus_per_trial is None:
        args.gpus_per_trial, why = default_gpus(cluster)
        log.info("GPUs per trial: %g (default: %s; --gpus-per-trial G to choose)", args.gpus_per_trial, why)
    bundle = bundle_of(args)
    if not cluster.up(bundle) and not cluster.addable(bundle):
        raise StudyError(refusal(args, bundle, cluster))
    if cluster.can_span_machines() and not stores.is_shared(ray_root):
        workers = ", ".join(t.name for t in cluster.node_types if t.max_workers and not t.head)
        where = (f"can add worker nodes ({workers})" if cluster.autoscaling else
                 f"spans {len({n.get('_host') for n in cluster.nodes})} machines")
        raise StudyError(f"the Ray cluster {where} but --checkpoint-storage {ray_root} is on a local disk "
                         f"({stores.fs_type(ray_root)}): trials on other nodes could not save or resume checkpoints; "
                         "pass --checkpoint-storage s3://BUCKET/PREFIX or a shared (NFS) path")
    if not cluster.up(bundle):
        wait_for_node(bundle, cluster, getattr(args, "wait_for_nodes", None))
    return cluster


def refusal(args: argparse.Namespace, bundle: dict[str, float], cluster: Cluster) -> str:
    ask = f"--gpus-per-trial {args.gpus_per_trial:g} --cpus-per-trial {args.cpus_per_trial:g}"
    nodes = ", ".join(sorted({fmt(n) for n in cluster.nodes})) or "none"
    if cluster.source:
        types = "; ".join(t.describe() for t in cluster.node_types)
        where = f"no node up ({nodes}) and no node type of the autoscaler ({types}; from {cluster.source})"
    else:
        where = f"no node of this Ray cluster ({nodes}), which has no autoscaler,"
    if cluster.source:
        hint = "ask for at most what one node type has, or add a node type that has it"
    else:
        hint = "use --gpus-per-trial 0 on CPU-only machines" if bundle.get("GPU") else "lower --cpus-per-trial"
    return f"{ask}: {where} holds one trial {fmt(bundle)} (GPUs and CPUs); {hint}"


def wait_for_node(bundle: dict[str, float], cluster: Cluster, limit: float | None) -> None:
    """Ask the autoscaler for a node that holds ``bundle`` and wait until one is up."""
    from ray.autoscaler.sdk import request_resources

    types = ", ".join(t.name for t in cluster.addable(bundle))
    if limit == 0:  # --wait-for-nodes 0: only the nodes up now, the autoscaler is not asked
        raise StudyError(f"--wait-for-nodes 0: no node up holds one trial {fmt(bundle)} (node types that could: "
                         f"{types}); pass a longer --wait-for-nodes, or none to wait for the autoscaler")
    start = last = time.monotonic()
    request_resources(bundles=[bundle])
    try:
        shown: tuple[int | None, int] | None = None
        while True:
            waited = time.monotonic() - start
            nodes = alive_nodes()
            up = sum(fits(n, bundle) for n in nodes)
            if up:
                log.info("a node for %s is up after %.0f s; trials start", fmt(bundle), waited)
                return
            if limit is not None and waited >= limit:
                raise StudyError(f"--wait-for-nodes {limit:g}: no node for one trial {fmt(bundle)} came up within "
                                 f"{limit:g} s (node types that hold it: {types}); see `ray status` on the head")
            state = (pending_launches(), len(nodes))
            if state != shown or time.monotonic() - last >= PROGRESS_S:
                log.info("waiting for the autoscaler: a node for one trial %s (%s); nodes requested %s, up %d/%d; "
                         "%.0f s waited%s", fmt(bundle), types, "?" if state[0] is None else state[0], up,
                         state[1], waited, f" of {limit:g}" if limit is not None else "")
                shown, last = state, time.monotonic()
            time.sleep(POLL_S)
    finally:
        request_resources(bundles=[])  # a persistent request: clear it; Tune's own demand takes over

