"""The cluster path: joining the Ray head on this node (real `ray start --head`), a stale address
file, refusing node-local checkpoints on a multi-machine cluster, and cluster.yaml's pins."""

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import study_env
from ray_head import ray_head

from oodlab import ray_connect, stores

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "studies" / "negprior_shift.py"
TINY = ["--shifts", "2", "--epochs", "1", "--train-n", "300", "--test-n", "100"]


def pinned(package: str) -> str:
    """The exact version pyproject.toml pins for ``package`` (``"name[extras]==X"``)."""
    m = re.search(rf'^\s*"{package}(\[[^\]]*\])?==([\w.]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert m, f"{package} is not pinned exactly (name==X) in pyproject.toml"
    return m.group(2)


def test_pins_match_the_installed_stack():
    import mlflow
    import optuna
    import ray

    assert pinned("ray") == ray.__version__  # a cluster's nodes and its client must run the same Ray
    assert pinned("optuna") == optuna.__version__
    assert pinned("mlflow") == mlflow.__version__


def test_cluster_yaml_installs_the_pinned_ray():
    text = (REPO / "cluster.yaml").read_text()
    cfg = yaml.safe_load(text)
    ray_version = pinned("ray")
    image = cfg["docker"]["image"]
    assert image.startswith("rayproject/ray:") and f":{ray_version}-" in image and "gpu" in image, image
    installs = " ".join(cfg["setup_commands"])
    assert f"ray[default,tune]=={ray_version}" in installs.replace("'", "").replace('"', "")
    assert re.search(r"pip install .*-e ~/oodlab\b", installs)  # the synced tree, on every node
    # .gitignore'd files (.venv, results) are not synced to the nodes
    assert cfg["rsync_filter"] == [".gitignore"] and cfg["rsync_exclude"]
    workers = cfg["available_node_types"]["gpu_worker"]["node_config"]
    assert "IamInstanceProfile" in workers  # workers reach the s3:// checkpoint bucket too
    assert "--backend-store-uri" in " ".join(cfg["head_setup_commands"])


# --- ray_connect: where a driver without --address goes -------------------------------------------


def _write_address(ray_tmp: str, address: str) -> None:
    (Path(ray_tmp) / "ray").mkdir(parents=True, exist_ok=True)
    (Path(ray_tmp) / "ray" / "ray_current_cluster").write_text(address)


def test_resolve_without_address(monkeypatch, ray_tmp):
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    assert ray_connect.resolve(None).address == "local"
    assert ray_connect.resolve("10.0.0.1:6379").address == "10.0.0.1:6379"  # explicit wins
    with socket.socket() as s:  # a port nothing listens on: a dead head
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    _write_address(ray_tmp, dead)
    t = ray_connect.resolve(None)
    assert t.address == "local" and "stale" in t.reason and dead in t.reason
    with socket.socket() as live:  # something answers at the recorded address
        live.bind(("127.0.0.1", 0))
        live.listen()
        _write_address(ray_tmp, f"127.0.0.1:{live.getsockname()[1]}")
        t = ray_connect.resolve(None)
        assert t.joins and t.address == f"127.0.0.1:{live.getsockname()[1]}"


def _study(args, ray_tmp, timeout=240):
    env = {k: v for k, v in study_env(ray_tmp).items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, str(STUDY), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.mark.slow
def test_study_joins_the_head_on_this_node_then_survives_its_stale_file(tmp_path, ray_tmp):
    """No --address, no RAY_ADDRESS: with a live head the trials run on it; after the head dies
    without `ray stop` (address file left behind) the study runs on a local Ray instead."""
    with ray_head(ray_tmp) as head:
        session = head.session_dir()
        out = _study(["--storage", tmp_path / "r", "--name", "joined", *TINY], ray_tmp)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        port = head.address.rpartition(":")[2]  # Ray records the node's own IP for 127.0.0.1
        assert re.search(rf"Ray: joined [\d.]+:{port} \(the Ray cluster running on this node", out.stdout), out.stdout
        trial = next((tmp_path / "r" / "ray" / "joined").glob("trial_*/result.json"))
        pid = json.loads(trial.read_text().splitlines()[-1])["pid"]
        assert list((session / "logs").glob(f"worker-*-{pid}.out")), f"trial pid {pid} is not a worker of the head"
        head.kill()
    assert (Path(ray_tmp) / "ray" / "ray_current_cluster").exists(), "a killed head leaves its address file"
    out = _study(["--storage", tmp_path / "r", "--name", "after-death", *TINY], ray_tmp)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Ray: local (stale address file" in out.stdout


@pytest.mark.slow
def test_multi_machine_cluster_refuses_local_checkpoints(tmp_path, ray_tmp, monkeypatch):
    """Two Ray nodes with different IPs (two machines to Ray) and node-local checkpoint storage:
    refused before any trial, naming --checkpoint-storage, nothing written."""
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.2")
    try:
        out = _study(["--smoke", "--storage", tmp_path / "r", "--address", cluster.address,
                      "--checkpoint-storage", tmp_path / "ckpt"], ray_tmp, timeout=120)
        assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
        assert "--checkpoint-storage" in out.stderr and "2 machines" in out.stderr
        assert [line for line in out.stderr.splitlines() if "error" in line.lower()] == \
            [out.stderr.strip().splitlines()[-1]], out.stderr  # one line (above it only Ray's INFO lines)
        assert not (tmp_path / "r").exists() and not (tmp_path / "ckpt").exists()
    finally:
        cluster.shutdown()


def test_shared_storage_detection(tmp_path, monkeypatch):
    assert stores.is_shared("s3://bucket/oodlab") and stores.is_shared("gs://bucket/x")
    local = stores.fs_type(str(tmp_path / "not" / "yet"))
    assert local != "unknown" and not stores.is_shared(str(tmp_path))
    monkeypatch.setenv("OODLAB_SHARED_FS_TYPES", local)  # e.g. a shared filesystem not in the list
    assert stores.is_shared(str(tmp_path))


# --- Docker image and KubeRay RayJob (no engine or cluster here: parse and check them) -------------


def test_dockerfile_builds_on_rays_pinned_image():
    text = (REPO / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={pinned('ray')}\n" in text
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-${VARIANT}" in text and "ARG VARIANT=cpu" in text
    assert "pip install" in text and "-e ." in text and "COPY --chown=ray:users k8s/run_study.sh" in text


def _entrypoint_flags(job: dict) -> tuple[Path, Path, list[str]]:
    import shlex

    argv = shlex.split(job["spec"]["entrypoint"])
    image_root = "/home/ray/oodlab/"  # where the Dockerfile puts the tree
    assert argv[0] == "bash" and argv[1].startswith(image_root) and argv[2].startswith(image_root)
    return REPO / argv[1].removeprefix(image_root), REPO / argv[2].removeprefix(image_root), argv[3:]


def test_rayjob_manifest_runs_a_real_study_that_resumes_on_retry(tmp_path):
    import importlib.util

    from oodlab.study import parse_args

    job = yaml.safe_load((REPO / "k8s" / "rayjob.yaml").read_text())
    pvc = yaml.safe_load((REPO / "k8s" / "pvc.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec, ray_version = job["spec"], pinned("ray")
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray_version and cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]["template"]["spec"]
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu["replicas"] == 0 and gpu["maxReplicas"] >= 1
    worker = gpu["template"]["spec"]
    assert head["containers"][0]["image"].endswith(f"/oodlab:ray{ray_version}-cpu")
    assert worker["containers"][0]["image"].endswith(f"/oodlab:ray{ray_version}-gpu")
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # head and workers mount the same ReadWriteMany claim at /results
    for pod in (head, worker):
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/results"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]

    script, study_file, flags = _entrypoint_flags(job)
    assert script.is_file() and study_file.is_file()
    mod_spec = importlib.util.spec_from_file_location("k8s_study", study_file)
    study = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(study)
    args = parse_args(str(study_file), study.configure, flags)  # the study's own parser
    assert args.storage == "/results" and args.checkpoint_storage.startswith("/results/")
    assert args.optuna_storage.startswith("journal:///results/") and not args.resume
    assert parse_args(str(study_file), study.configure, [*flags, "--resume"]).resume

    # run_study.sh: first attempt runs, a retry (the study's folder on the volume exists) resumes
    local = [f.replace("/results", str(tmp_path / "results")) for f in flags]
    run = lambda: subprocess.run(["bash", str(script), str(study_file), *local], capture_output=True,
                                 text=True, env={**study_env(str(tmp_path)), "PYTHON": "echo"}, timeout=30)
    first = run()
    assert first.returncode == 0 and first.stdout.split()[1:] == local
    (Path(args.checkpoint_storage.replace("/results", str(tmp_path / "results"))) / args.name).mkdir(parents=True)
    retry = run()
    assert retry.returncode == 0 and retry.stdout.split()[1:] == [*local, "--resume"]
