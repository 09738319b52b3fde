"""Keep one MLflow tracking server alive on a head node: ``python -m oodlab.tracking_server [mlflow flags]``.

Why: cluster.yaml's ``head_setup_commands`` run again on every ``ray up`` and after a container
restart; a plain ``nohup mlflow server &`` then either starts a duplicate that cannot bind its
port or, after a crash, nothing at all. This watcher is idempotent and restarts the server:

- one watcher per port: a second one (a second ``ray up``) finds the lock held and exits 0;
- every ``--interval`` seconds it asks the server's ``/health``; a server that does not answer
  ``--failures`` times in a row is stopped (if it still runs) and started again;
- a server already answering on the port when the watcher starts (started by hand) is left alone
  while it stays healthy.

    python -m oodlab.tracking_server --port 5000 -- --backend-store-uri postgresql://oodlab@db/mlflow \\
        --artifacts-destination s3://bucket/oodlab/mlartifacts

Flags after ``--`` go to ``mlflow server`` (``--host`` defaults to 127.0.0.1: reach it through
``ray attach -p 5000`` or ``ray dashboard``'s port-forwarding, never an open port).
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

log = logging.getLogger("oodlab.tracking_server")


def healthy(host: str, port: int, timeout: float = 5.0) -> bool:
    """MLflow's own health endpoint answers ``OK``."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=timeout) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def server_env() -> dict[str, str]:
    """The environment of an ``mlflow server`` / ``mlflow ui`` child. MLflow 3 starts 7 ``huey``
    job-runner processes for its GenAI jobs (scorers, prompt optimisation), which oodlab never
    submits: a start then costs 16.9 CPU-s on 2 cores instead of 4.7. A value the user set wins."""
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}


def start(host: str, port: int, mlflow_args: list[str], log_file: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), *mlflow_args]
    log.info("starting: %s", " ".join(cmd))
    with open(log_file, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=server_env())


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # mlflow server runs uvicorn/gunicorn workers in its group
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def watch(host: str, port: int, mlflow_args: list[str], state_dir: Path, interval: float, failures: int,
          start_grace: float) -> int:
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = open(state_dir / f"mlflow-{port}.lock", "w")  # held for the watcher's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"[oodlab] an MLflow server watcher for port {port} already runs; nothing to do", flush=True)
        return 0
    (state_dir / f"mlflow-{port}.pid").write_text(str(os.getpid()))
    proc: subprocess.Popen[bytes] | None = None
    started_at = 0.0
    missed = 0

    def on_term(*_: object) -> None:
        stop(proc)
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    while True:
        if healthy(host, port):
            missed = 0
        elif proc is not None and proc.poll() is None and time.time() - started_at < start_grace:
            pass  # still starting
        else:
            missed += 1
            if proc is None or proc.poll() is not None or missed >= failures:
                if proc is not None:
                    log.warning("MLflow server on port %d is not healthy; restarting it", port)
                stop(proc)
                proc, started_at, missed = start(host, port, mlflow_args, state_dir / f"mlflow-{port}.log"), \
                    time.time(), 0
        time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    ours, theirs = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(prog="python -m oodlab.tracking_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default localhost only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--state-dir", type=Path, default=Path.home() / ".oodlab", help="lock, pid and log files")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between health checks (default 10)")
    p.add_argument("--failures", type=int, default=3, help="failed checks in a row before a restart (default 3)")
    p.add_argument("--start-grace", type=float, default=120.0,
                   help="seconds a starting server may take before checks count (default 120)")
    a = p.parse_args(ours)
    logging.basicConfig(level=logging.INFO, format="[oodlab] %(message)s")
    return watch(a.host, a.port, theirs, a.state_dir, a.interval, a.failures, a.start_grace)


if __name__ == "__main__":
    sys.exit(main())
