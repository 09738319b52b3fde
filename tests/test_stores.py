"""Stores that survive: the head's MLflow server watcher (idempotent, restarts a dead server) and
passwords that never reach a printed line. (A study that writes its stores down, so `oodlab
list/report/export` need only `--storage`: tests/test_postgres.py.) Real MLflow server."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import end_group, oodlab_cli, tracking_server_watcher, wait_for
from ray_head import free_port

from oodlab import stores, tracking_server


def _pids(match: Callable[[list[bytes]], bool], pgid: int | None = None) -> list[int]:
    """Processes whose argv ``match`` accepts (and, given ``pgid``, of that process group)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if match(argv) and (pgid is None or os.getpgid(int(proc.name)) == pgid):
                    found.append(int(proc.name))
            except OSError:  # gone meanwhile
                continue
    return found


def _server_pids(port: int) -> list[int]:
    """The `mlflow server` processes on ``port`` (the watcher's children)."""
    return _pids(lambda argv: b"mlflow" in argv and b"server" in argv and str(port).encode() in argv)


def test_passwords_never_leave_a_url():
    url = "postgresql+psycopg://oodlab:s3cr%40t@db.example:5432/optuna?sslmode=require"
    assert stores.redact(url) == "postgresql+psycopg://oodlab:***@db.example:5432/optuna?sslmode=require"
    assert stores.strip_password(url) == "postgresql+psycopg://oodlab@db.example:5432/optuna?sslmode=require"
    assert stores.strip_password("http://me:pw@mlflow:5000/x") == "http://me@mlflow:5000/x"
    for plain in ("sqlite:////r/optuna.db", "journal:///r/optuna.log", "http://127.0.0.1:5000", "s3://b/p",
                  "postgresql://oodlab@db/mlflow"):
        assert stores.redact(plain) == plain == stores.strip_password(plain)


def test_list_on_a_missing_folder_is_one_line(tmp_path):
    out = oodlab_cli("list", "--storage", tmp_path / "nope")
    assert out.returncode == 2 and out.stderr.strip() == f"error: --storage {tmp_path / 'nope'}: no such folder"


@pytest.mark.slow
def test_tracking_server_watcher_is_idempotent_and_restarts_a_dead_server(tmp_path):
    port = free_port()
    args = ("--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination", tmp_path / "a")
    first = tracking_server_watcher(port, tmp_path / "state", *args)
    try:
        wait_for(lambda: tracking_server.healthy("127.0.0.1", port), "the MLflow server answers /health")
        second = tracking_server_watcher(port, tmp_path / "state", *args)  # a second `ray up` runs the setup again
        assert second.wait(timeout=60) == 0 and "already runs" in second.stdout.read()
        (pid,) = {os.getpgid(p) for p in _server_pids(port)}  # one server (one process group)
        huey = _pids(lambda argv: any(b"huey_consumer" in a for a in argv), pgid=pid)
        assert not huey, "MLflow's GenAI job runners are off (server_env)"
        os.killpg(pid, signal.SIGKILL)  # the server dies
        wait_for(lambda: not tracking_server.healthy("127.0.0.1", port, timeout=1), "the server is down", 30)
        wait_for(lambda: tracking_server.healthy("127.0.0.1", port), "the watcher restarts it")
        assert {os.getpgid(p) for p in _server_pids(port)} - {pid}, "a new server process"
    finally:
        end_group(first)
    wait_for(lambda: not _server_pids(port), "the watcher stops its server when it is stopped", 30)
