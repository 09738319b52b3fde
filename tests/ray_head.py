"""A real, isolated ``ray start --head`` for tests: its own RAY_TMPDIR, 127.0.0.1, free ports,
stopped by killing its own process group (never ``ray stop``, which stops every Ray on the machine)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import kill_leftovers, study_env

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    proc: subprocess.Popen
    address: str  # GCS host:port
    dashboard: str  # http://127.0.0.1:PORT ("" without the dashboard)
    ray_tmp: str

    def session_dir(self) -> Path:
        return (Path(self.ray_tmp) / "ray" / "session_latest").resolve()

    def kill(self) -> None:
        """SIGKILL the head's process group: a head that dies without `ray stop` (its address file stays)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        kill_leftovers(self.ray_tmp)


@contextlib.contextmanager
def ray_head(ray_tmp: str, num_cpus: int = 2, dashboard: bool = False, timeout: float = 120,
             env: dict[str, str] | None = None, port: int | None = None, extra: tuple[str, ...] = ()):
    """``extra``: more ``ray start`` flags (e.g. ``--autoscaling-config=FILE``); ``port``: the GCS port."""
    gcs, dash = port or free_port(), free_port()
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           f"--num-cpus={num_cpus}", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--include-dashboard={str(dashboard).lower()}", *extra]
    if dashboard:
        cmd += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"]
    log = open(Path(ray_tmp) / "head.log", "wb")  # closed below
    env = env or {k: v for k, v in study_env(ray_tmp).items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(proc, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}" if dashboard else "", ray_tmp)
    try:
        deadline = time.time() + timeout
        while not _ready(head, dashboard):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("ray start --head failed: " + (Path(ray_tmp) / "head.log").read_text()[-3000:])
            time.sleep(0.5)
        yield head
    finally:
        head.kill()
        log.close()


def _ready(head: Head, dashboard: bool) -> bool:
    if not (Path(head.ray_tmp) / "ray" / "ray_current_cluster").exists():
        return False
    if not dashboard:
        return True
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{head.dashboard}/api/version", timeout=2) as r:
            return r.status == 200
    except urllib.error.HTTPError as e:
        return e.code == 401  # token authentication on: up, and asking for the token
    except OSError:
        return False
