"""Studies on Ray's real autoscaler: the fake multi-node provider runs the autoscaler on this
machine and starts worker raylets with their node type's resources (GPUs as fake resources, so
trials train on the CPU). Head: CPU 0 (the driver only, as in cluster.yaml); workers at min 0.

One cluster for the module (started once; its GCS port is in the config, as the fake provider
needs). The studies run in order: a CPU study (launches a CPU worker, no GPU worker), then the
default ``--gpus-per-trial`` (must request GPUs: the first GPU worker appears for it); refusals (a
request no node type meets, ``--wait-for-nodes``, node-local checkpoints) run first."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, study_env
from ray_head import free_port, ray_head

from oodlab import capacity, stores

STUDY = REPO / "studies" / "negprior_shift.py"
TINY = ["--epochs", "1", "--train-n", "300", "--test-n", "100"]
TYPES = {  # name: (resources, max_workers)
    "cpu_worker": ({"CPU": 1}, 1),
    "gpu_worker": ({"CPU": 1, "GPU": 1}, 1),
    "gpu2_worker": ({"CPU": 1, "GPU": 2}, 1),  # only for the --wait-for-nodes refusal
}


def fake_config(port: int) -> dict:
    """An autoscaling config for Ray's fake multi-node provider (Ray docs: "Testing autoscaling locally")."""
    return {
        "cluster_name": "oodlab-fake", "max_workers": 3, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{port}"},
        "auth": {"ssh_user": "ubuntu"},
        "head_node_type": "ray.head.default",  # the fake provider's name for the head
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            **{name: {"resources": res, "node_config": {}, "min_workers": 0, "max_workers": n}
               for name, (res, n) in TYPES.items()}},
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


class Fake:
    def __init__(self, ray_tmp: str, config: Path, shared_fs: str):
        self.ray_tmp, self.config = ray_tmp, config
        self.env = {k: v for k, v in study_env(ray_tmp).items() if k != "RAY_ADDRESS"}
        self.study_env = {**self.env, "OODLAB_SHARED_FS_TYPES": shared_fs}  # tmp stands in for NFS

    def launched(self) -> list[str]:
        """Node types the autoscaler added so far, in order (its event log)."""
        logs = Path(self.ray_tmp, "ray", "session_latest", "logs").glob("monitor*")
        text = "".join(p.read_text(errors="ignore") for p in logs)
        return [t for n, t in re.findall(r"Adding (\d+) node\(s\) of type (\w+)", text) for _ in range(int(n))]

    def study(self, *args: object, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(STUDY), *map(str, args)], env=env or self.study_env,
                              capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def fake():
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="rf", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    port = free_port()
    config = Path(ray_tmp) / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(fake_config(port), sort_keys=False))
    shared = stores.fs_type(ray_tmp)
    env = {k: v for k, v in study_env(ray_tmp).items() if k != "RAY_ADDRESS"}
    env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    try:
        with ray_head(ray_tmp, num_cpus=0, env=env, port=port, extra=(f"--autoscaling-config={config}",)):
            yield Fake(ray_tmp, config, shared)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _one_line(stderr: str) -> str:
    """The refusal: one ``error: …`` line and nothing else on stderr."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.mark.slow
def test_refusals_before_any_node_is_asked_for(fake, tmp_path, monkeypatch, capsys):
    """A request no node type can meet, and node-local checkpoints on a cluster that can add
    nodes: exit 2, one line, nothing written, no node launched. --wait-for-nodes: exit 2 when
    the node it waits for is not up in time. In process (the study's own main joins the head)."""
    from conftest import study_main

    for k, v in fake.study_env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    storage = tmp_path / "r"

    def refused(*flags: object) -> str:
        assert study_main(STUDY, "--storage", storage, "--shifts", "2", *TINY, *flags) == 2
        out = capsys.readouterr()
        assert "waiting for the autoscaler" not in out.out
        return _one_line(out.err)

    err = refused("--gpus-per-trial", "4")
    assert "--gpus-per-trial 4" in err and "gpu_worker {CPU: 1, GPU: 1}" in err and "autoscaling.yaml" in err, err
    err = refused("--cpus-per-trial", "3", "--gpus-per-trial", "0")
    assert "no node type of the autoscaler" in err and "{CPU: 3}" in err, err
    err = refused("--gpus-per-trial", "2", "--wait-for-nodes", "0")
    assert "--wait-for-nodes 0" in err and "gpu2_worker" in err, err
    monkeypatch.delenv("OODLAB_SHARED_FS_TYPES")  # /tmp is node-local again
    err = refused()
    assert "can add worker nodes (cpu_worker, gpu_worker, gpu2_worker)" in err and "--checkpoint-storage" in err, err
    assert not storage.exists() and fake.launched() == []


@pytest.mark.slow
def test_studies_wait_for_the_autoscaler(fake, tmp_path):
    import optuna
    from mlflow.tracking import MlflowClient

    def finished(out: subprocess.CompletedProcess, name: str, storage: Path, n: int) -> None:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        trials = optuna.load_study(study_name=name, storage=stores.default_optuna_url(storage)).trials
        assert [t.state.name for t in trials] == ["COMPLETE"] * n
        client = MlflowClient(stores.default_mlflow_uri(storage))
        runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(children) == n and {r.info.status for r in children} == {"FINISHED"}

    before = fake.launched()
    # CPU only: a CPU worker is launched for it, no GPU worker
    out = fake.study("--storage", tmp_path / "cpu", "--name", "cpu", "--shifts", "2", *TINY, "--gpus-per-trial", "0")
    finished(out, "cpu", tmp_path / "cpu", 1)
    assert re.search(r"waiting for the autoscaler: a node for one trial \{CPU: 1\} \(cpu_worker, gpu_worker, "
                     r"gpu2_worker\); nodes requested \d+, up 0/1; 0 s waited", out.stdout), out.stdout
    assert fake.launched() == [*before, "cpu_worker"], fake.launched()
    assert "Ray: joined" in out.stdout  # no --address: the head on this node

    # the default --gpus-per-trial on a cluster that can add GPU nodes requests GPUs: the GPU worker comes for it
    # (a CPU-only trial would fit on the CPU worker that is up)
    out = fake.study("--storage", tmp_path / "dflt", "--name", "dflt", "--shifts", "2", *TINY)
    finished(out, "dflt", tmp_path / "dflt", 1)
    share = capacity.DEFAULT_GPU_SHARE
    assert f"GPUs per trial: {share:g} (default: the cluster has or can add GPU nodes: gpu_worker" in out.stdout
    assert f"a node for one trial {{CPU: 1, GPU: {share:g}}} (gpu_worker, gpu2_worker)" in out.stdout, out.stdout
    assert re.search(r"a node for \{CPU: 1, GPU: 0.5\} is up after \d+ s", out.stdout), out.stdout
    assert fake.launched() == [*before, "cpu_worker", "gpu_worker"], fake.launched()
    assert "gpu2_worker" not in fake.launched()  # --wait-for-nodes 0 asked the autoscaler for nothing


@pytest.mark.slow
def test_node_types_from_the_environment(tmp_path, ray_tmp, monkeypatch, capsys):
    """KubeRay's autoscaler reads its worker groups in another container: $OODLAB_NODE_TYPES states
    them (k8s/rayjob.yaml). The default then requests GPUs; --wait-for-nodes 0 asks for nothing.
    In process (the study's own main; it starts a local Ray, refuses, stops it)."""
    from conftest import study_main

    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("OODLAB_NODE_TYPES", '{"gpu": {"resources": {"CPU": 1, "GPU": 1}, "max_workers": 2}}')
    monkeypatch.setenv("OODLAB_SHARED_FS_TYPES", stores.fs_type(str(tmp_path)))
    run = lambda *a: study_main(STUDY, "--storage", tmp_path / "r", "--shifts", "2", *TINY, *a)
    assert run("--wait-for-nodes", "0") == 2
    out = capsys.readouterr()
    assert "GPUs per trial: 0.5 (default: the cluster has or can add GPU nodes: gpu;" in out.out, out.out
    err = _one_line(out.err)
    assert "--wait-for-nodes 0: no node up holds one trial {CPU: 1, GPU: 0.5} (node types that could: gpu)" in err
    assert run("--gpus-per-trial", "2") == 2
    out = capsys.readouterr()
    assert "GPUs per trial" not in out.out  # given, not chosen
    err = _one_line(out.err)
    assert "gpu {CPU: 1, GPU: 1} (max 2); from $OODLAB_NODE_TYPES" in err, err
    assert not (tmp_path / "r").exists()
