"""The cluster path: joining the Ray head on this node (real `ray start --head`), a stale address
file, refusing node-local checkpoints on a multi-machine cluster, and cluster.yaml's pins."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, study_env, study_main
from ray_head import ray_head

from oodlab import ray_connect, stores

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


def _cluster_yaml() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema():
    """Ray's own schema (ray-schema.json, as `ray up` checks it); a wrong key fails the same check."""
    import jsonschema
    from ray.autoscaler._private.util import validate_config
    from ray.autoscaler.sdk import fillout_defaults

    validate_config(fillout_defaults(_cluster_yaml()))
    with pytest.raises(jsonschema.ValidationError):
        validate_config(fillout_defaults({**_cluster_yaml(), "head_nodes_type": "head"}))


def test_cluster_yaml_nodes_start_from_the_projects_image():
    cfg, ray_version = _cluster_yaml(), pinned("ray")
    image = cfg["docker"]["image"]  # the one place: no head_image / worker_image / per-type docker
    assert image.endswith(f"/oodlab:ray{ray_version}-gpu"), image
    assert "head_image" not in cfg["docker"] and "worker_image" not in cfg["docker"]
    assert not any("docker" in t for t in cfg["available_node_types"].values())
    assert (REPO / "cluster.yaml").read_text().count("oodlab:ray") == 1
    # the image holds the project: setup installs it only on Ray's plain image (the documented fallback)
    (install, _) = cfg["setup_commands"]
    assert install.startswith('python -c "import oodlab, torch, mlflow, optuna" 2>/dev/null || pip install')


def test_cluster_yaml_node_types_are_what_studies_need():
    from oodlab import capacity

    cfg = _cluster_yaml()
    types = {t.name: t for t in capacity._parse_types(cfg)}
    cluster = capacity.Cluster(nodes=[{"CPU": 0.0, "_host": "head"}], node_types=list(types.values()),
                               source="cluster.yaml")
    assert types["head"].head and types["head"].resources == {"CPU": 0.0}  # trials never on the head
    assert [t.name for t in cluster.addable({"CPU": 1.0}) if "GPU" not in t.resources] == ["cpu_worker"]
    gpu = [t.name for t in cluster.addable({"CPU": 1.0, "GPU": 1.0})]
    assert gpu == ["gpu_worker", "gpu_spot_worker"]
    nodes = cfg["available_node_types"]
    assert nodes["gpu_spot_worker"]["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
    assert "InstanceMarketOptions" not in nodes["gpu_worker"]["node_config"]
    assert all(nodes[n]["min_workers"] == 0 for n in ("cpu_worker", "gpu_worker", "gpu_spot_worker"))
    assert capacity.default_gpus(cluster)[0] == capacity.DEFAULT_GPU_SHARE  # a plain study trains on GPUs
    assert cluster.can_span_machines()  # so it needs shared checkpoints


def test_token_auth_on_and_never_switched_off():
    cfg = _cluster_yaml()
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the laptop's token, on every node
    for cmd in (cfg["head_start_ray_commands"][-1], cfg["worker_start_ray_commands"][-1]):
        assert "RAY_AUTH_MODE=token" in cmd and "ray start" in cmd
    for f in ("cluster.yaml", "Dockerfile", "Makefile", "k8s/rayjob.yaml"):
        assert "RAY_AUTH_MODE=disabled" not in (REPO / f).read_text(), f
    job = yaml.safe_load((REPO / "k8s" / "rayjob.yaml").read_text())
    assert job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}


def test_no_secret_is_synced_and_the_head_boots_without_cluster_env(tmp_path):
    """cluster.env is committed and holds names only; every command that reads it first checks it is
    there; the head's first setup command runs with and without it (no SSM parameter: nothing fetched)."""
    cfg = _cluster_yaml()
    assert "rsync_filter" not in cfg  # .gitignore'd files are not what keeps secrets out: there are none
    tracked = subprocess.run(["git", "ls-files", "cluster.env"], cwd=REPO, capture_output=True, text=True).stdout
    assert tracked.strip() == "cluster.env"
    for line in (REPO / "cluster.env").read_text().splitlines():
        name, _, value = line.partition("=")
        if line and not line.startswith("#"):
            assert value.split("#")[0].strip() == "", f"cluster.env must stay empty in git: {name}"
    assert not re.search(r"://[^/\s@]+:[^/\s@]+@", (REPO / "cluster.env").read_text())  # no user:password@
    commands = cfg["head_setup_commands"] + cfg["head_start_ray_commands"]
    for cmd in commands:
        if "cluster.env" in cmd:
            assert cmd.startswith("if [ -f ~/oodlab/cluster.env ]; then"), cmd
    assert "oodlab.tracking_server" in cfg["head_setup_commands"][1]  # the watched MLflow server
    first = cfg["head_setup_commands"][0]
    for with_env in (False, True):
        home = tmp_path / f"home{with_env}"
        (home / "oodlab").mkdir(parents=True)
        if with_env:
            shutil.copy(REPO / "cluster.env", home / "oodlab" / "cluster.env")
        out = subprocess.run(["bash", "-c", first], env={"HOME": str(home), "PATH": os.environ["PATH"]},
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and not (home / ".pgpass").exists(), out.stderr


def test_iam_policies_grant_what_the_cluster_needs():
    cfg = _cluster_yaml()
    head = json.loads((REPO / "iam" / "oodlab-head-policy.json").read_text())
    worker = json.loads((REPO / "iam" / "oodlab-worker-policy.json").read_text())
    nodes = cfg["available_node_types"]
    assert nodes["head"]["node_config"]["IamInstanceProfile"] == {"Name": "oodlab-head"}
    worker_profiles = {nodes[n]["node_config"]["IamInstanceProfile"]["Name"] for n in nodes if n != "head"}
    assert worker_profiles == {"oodlab-worker"}
    allowed = {a: s["Resource"] for s in head["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str)
                                                                      else s["Action"])}
    assert allowed["iam:PassRole"] == ["arn:aws:iam::ACCOUNT_ID:role/oodlab-worker",
                                       "arn:aws:iam::ACCOUNT_ID:instance-profile/oodlab-worker"]
    for action in ("ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "ec2:DescribeInstances"):
        assert action in allowed
    assert {a for s in worker["Statement"] for a in s["Action"]} == {"s3:GetObject", "s3:PutObject",
                                                                      "s3:DeleteObject", "s3:ListBucket"}


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
def test_study_joins_the_head_on_this_node_then_survives_its_stale_file(tmp_path, ray_tmp, monkeypatch):
    """No --address, no RAY_ADDRESS: with a live head the trials run on it; after the head dies
    without `ray stop` (address file left behind) the driver starts a local Ray instead (in
    process: the study's own connect step, then a task on that Ray)."""
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
    import ray

    from oodlab import ray_connect

    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    target = ray_connect.init(None, num_cpus=1, include_dashboard=False)
    try:
        assert not target.joins and target.reason.startswith("stale address file"), target
        assert ray.get(ray.remote(lambda: 42).remote()) == 42
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_multi_machine_cluster_refuses_local_checkpoints(tmp_path, ray_tmp, monkeypatch, capsys):
    """Two Ray nodes with different IPs (two machines to Ray) and node-local checkpoint storage:
    refused before any trial, naming --checkpoint-storage, nothing written. In process (the
    study's own main joins the cluster)."""
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.2")
    try:
        rc = study_main(STUDY, "--smoke", "--storage", tmp_path / "r", "--address", cluster.address,
                        "--checkpoint-storage", tmp_path / "ckpt")
        err = capsys.readouterr().err
        assert rc == 2, err[-2000:]
        assert "--checkpoint-storage" in err and "2 machines" in err
        assert [line for line in err.splitlines() if "error" in line.lower()] == \
            [err.strip().splitlines()[-1]], err  # one line (above it only Ray's INFO lines)
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


def test_rayjob_manifest_parses_as_the_study_and_its_entrypoint_resumes_on_retry(tmp_path):
    """The RayJob's image, volume, stores and worker group, its flags through the study's own parser,
    and run_study.sh (with PYTHON=echo: no study runs) adding --resume when the study's folder exists."""
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
    assert args.mlflow_uri == _mlflow_service_url() and not args.resume  # the tracking server, not sqlite
    env = {e["name"]: e for e in head["containers"][0]["env"]}
    assert env["OODLAB_OPTUNA_STORAGE"]["valueFrom"] == {"secretKeyRef": {"name": "oodlab-stores", "key": "optuna-db"}}
    # the worker groups, as the study's capacity check reads them (KubeRay's autoscaler is in another container)
    from oodlab import capacity

    types = {t.name: t for t in capacity._types_from_env_text(env["OODLAB_NODE_TYPES"]["value"])}
    limits = worker["containers"][0]["resources"]["limits"]
    resources = {"CPU": float(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"])}
    assert types == {"gpu": capacity.NodeType("gpu", resources, gpu["maxReplicas"])}
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


def _mlflow_manifest() -> tuple[dict, dict]:
    deployment, service = yaml.safe_load_all((REPO / "k8s" / "mlflow.yaml").read_text())
    return deployment, service


def _mlflow_service_url() -> str:
    _, service = _mlflow_manifest()
    return f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"


def test_mlflow_deployment_is_a_tracking_server_on_a_database():
    deployment, service = _mlflow_manifest()
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"] == pod["metadata"]["labels"] == deployment["spec"]["selector"]["matchLabels"]
    (c,) = pod["spec"]["containers"]
    assert c["image"].endswith(f"/oodlab:ray{pinned('ray')}-cpu")  # the project's pinned MLflow
    args = c["args"]
    flag = lambda name: args[args.index(name) + 1]
    assert flag("--backend-store-uri") == "$(MLFLOW_DB)" and "sqlite" not in " ".join(args)
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_DB"]["valueFrom"] == {"secretKeyRef": {"name": "oodlab-stores", "key": "mlflow-db"}}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"  # as tracking_server.server_env
    assert flag("--artifacts-destination").startswith("/results/")
    assert c["volumeMounts"][0]["mountPath"] == "/results"
    assert service["metadata"]["name"] in flag("--allowed-hosts").split(",")  # MLflow 3 checks the Host header
    assert c["readinessProbe"]["httpGet"]["path"] == c["livenessProbe"]["httpGet"]["path"] == "/health"
    # every flag exists in the pinned MLflow's `mlflow server` (its click command, read in process)
    from mlflow.cli import server

    options = {o for p in server.params for o in (*p.opts, *p.secondary_opts)}
    assert "--backend-store-uri" in options
    assert not [a for a in args if a.startswith("--") and a not in options]
    assert c["command"] == ["python", "-m", "mlflow", "server"]


def test_postgres_manifest_makes_both_databases_from_a_secret():
    config, stateful, service = yaml.safe_load_all((REPO / "k8s" / "postgres.yaml").read_text())
    assert "CREATE DATABASE mlflow;" in config["data"]["databases.sql"]
    assert "CREATE DATABASE optuna;" in config["data"]["databases.sql"]
    (c,) = stateful["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "oodlab-postgres"
    assert "value" not in env["POSTGRES_PASSWORD"]
    assert stateful["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert service["spec"]["selector"] == stateful["spec"]["template"]["metadata"]["labels"]
