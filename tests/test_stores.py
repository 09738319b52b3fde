"""Stores that survive: the head's MLflow server watcher (idempotent, restarts a dead server), a
study that writes down its stores so `oodlab list/report/export` need only `--storage`, and
passwords that never reach a printed line or a file. Real PostgreSQL, real MLflow server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, study_env
from pg_server import pg_fixture  # noqa: F401 - registers the module-scoped fixture `pg`
from ray_head import free_port

from oodlab import stores, tracking_server

STUDY = REPO / "studies" / "negprior_shift.py"
TINY = ["--shifts", "2", "--epochs", "1", "--train-n", "300", "--test-n", "100"]


def _oodlab(*args: object, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "OODLAB_OPTUNA_STORAGE")}
    return subprocess.run([sys.executable, "-m", "oodlab.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env=env)


def _watcher(port: int, state: Path, *mlflow_args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "oodlab.tracking_server", "--port", str(port), "--state-dir",
                             str(state), "--interval", "1", "--failures", "2", "--start-grace", "240", "--",
                             "--workers", "1", *map(str, mlflow_args)],  # one worker: starts faster on 2 cores
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True)


def _wait(cond, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.5)


def _server_pids(port: int) -> list[int]:
    """The `mlflow server` processes on ``port`` (the watcher's children)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"mlflow" in argv and b"server" in argv and str(port).encode() in argv:
                found.append(int(proc.name))
    return found


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_passwords_never_leave_a_url():
    url = "postgresql+psycopg://oodlab:s3cr%40t@db.example:5432/optuna?sslmode=require"
    assert stores.redact(url) == "postgresql+psycopg://oodlab:***@db.example:5432/optuna?sslmode=require"
    assert stores.strip_password(url) == "postgresql+psycopg://oodlab@db.example:5432/optuna?sslmode=require"
    assert stores.strip_password("http://me:pw@mlflow:5000/x") == "http://me@mlflow:5000/x"
    for plain in ("sqlite:////r/optuna.db", "journal:///r/optuna.log", "http://127.0.0.1:5000", "s3://b/p",
                  "postgresql://oodlab@db/mlflow"):
        assert stores.redact(plain) == plain == stores.strip_password(plain)


def test_list_on_a_missing_folder_is_one_line(tmp_path):
    out = _oodlab("list", "--storage", tmp_path / "nope")
    assert out.returncode == 2 and out.stderr.strip() == f"error: --storage {tmp_path / 'nope'}: no such folder"


@pytest.mark.slow
def test_tracking_server_watcher_is_idempotent_and_restarts_a_dead_server(tmp_path):
    port = free_port()
    args = ("--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination", tmp_path / "a")
    first = _watcher(port, tmp_path / "state", *args)
    try:
        _wait(lambda: tracking_server.healthy("127.0.0.1", port), "the MLflow server answers /health")
        second = _watcher(port, tmp_path / "state", *args)  # a second `ray up` runs the setup again
        assert second.wait(timeout=60) == 0 and "already runs" in second.stdout.read()
        (pid,) = {os.getpgid(p) for p in _server_pids(port)}  # one server (one process group)
        os.killpg(pid, signal.SIGKILL)  # the server dies
        _wait(lambda: not tracking_server.healthy("127.0.0.1", port, timeout=1), "the server is down", 30)
        _wait(lambda: tracking_server.healthy("127.0.0.1", port), "the watcher restarts it")
        assert {os.getpgid(p) for p in _server_pids(port)} - {pid}, "a new server process"
    finally:
        _end(first)
    _wait(lambda: not _server_pids(port), "the watcher stops its server when it is stopped", 30)


@pytest.mark.slow
def test_a_study_remembers_its_stores(tmp_path, ray_tmp, pg):
    """A study on PostgreSQL (Optuna) and an MLflow tracking server (backed by PostgreSQL, kept up by
    the watcher); then `oodlab list`, `report` and `export` with `--storage` alone. The Optuna URL
    carries a password (the test server trusts any): it is written down nowhere."""
    optuna_db, mlflow_db = pg.createdb("optuna_mem"), pg.createdb("mlflow_mem")
    secret = optuna_db.replace("postgres@", "postgres:hunter2@")
    port, storage = free_port(), tmp_path / "r"
    server = _watcher(port, tmp_path / "state", "--backend-store-uri", mlflow_db, "--artifacts-destination",
                      tmp_path / "artifacts")
    try:
        _wait(lambda: tracking_server.healthy("127.0.0.1", port), "the MLflow server answers /health")
        uri = f"http://127.0.0.1:{port}"
        out = subprocess.run([sys.executable, str(STUDY), "--storage", str(storage), "--name", "mem", *TINY,
                              "--optuna-storage", secret, "--mlflow-uri", uri], env=study_env(ray_tmp),
                             capture_output=True, text=True, timeout=300, cwd=REPO)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "hunter2" not in out.stdout + out.stderr
        files = [p for p in storage.rglob("*") if p.is_file() and p.stat().st_size < 10**7]
        assert not [p for p in files if b"hunter2" in p.read_bytes()], "a password was written to the results"
        assert json.loads((storage / "stores.json").read_text())["mem"] == {
            "optuna_storage": optuna_db, "mlflow_uri": uri, "checkpoint_storage": str(storage / "ray")}
        assert not (storage / "optuna.db").exists() and not (storage / "mlflow.db").exists()

        listed = _oodlab("list", "--storage", storage)
        assert listed.returncode == 0 and "mem " in listed.stdout and listed.stdout.split("\n")[1].split()[1] == "1", \
            listed.stdout + listed.stderr
        report = _oodlab("report", "mem", "--storage", storage)
        assert report.returncode == 0, report.stdout[-2000:] + report.stderr[-2000:]
        assert "Best trials" in report.stdout and "shift" in report.stdout
        out_dir = tmp_path / "export"
        export = _oodlab("export", "mem", out_dir, "--storage", storage)
        assert export.returncode == 0, export.stderr[-2000:]
        assert "exported mem: 1 Optuna trials, 2 MLflow runs" in export.stdout, export.stdout
        # the flags still win: a wrong explicit store is refused in one line, naming no password
        wrong = _oodlab("report", "mem", "--storage", storage, "--optuna-storage",
                        f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/x")
        assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1 and "hunter2" not in wrong.stderr
    finally:
        _end(server)
