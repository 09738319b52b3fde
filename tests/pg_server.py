"""A real PostgreSQL server for tests: initdb + pg_ctl in a temp folder, 127.0.0.1 on a free port,
trust auth, one database per store (Optuna and MLflow both keep an ``alembic_version`` table)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ray_head import free_port


def pg_bin() -> Path | None:
    """Debian's versioned folder (newest first), else PATH."""
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True):
        if (Path(d) / "initdb").exists():
            return Path(d)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


@dataclass
class Server:
    port: int
    bin: Path
    as_user: list[str]

    def url(self, db: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def createdb(self, name: str) -> str:
        subprocess.run([*self.as_user, str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                        "-U", "postgres", name], check=True, capture_output=True)
        return self.url(name)


@contextlib.contextmanager
def postgres(bindir: Path) -> Iterator[Server]:
    root = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as Debian's postgres user
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    port = free_port()
    data = root / "data"
    run = lambda *cmd: subprocess.run([*as_user, *map(str, cmd)], check=True, capture_output=True)
    try:
        run(bindir / "initdb", "-D", data, "-A", "trust", "-U", "postgres")
        run(bindir / "pg_ctl", "-D", data, "-l", root / "log", "-w", "-t", "60", "start", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off")
        yield Server(port, bindir, as_user)
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module", name="pg")
def pg_fixture() -> Iterator[Server]:
    """A PostgreSQL server for one test module (skips where its binaries are missing); test modules
    import this fixture."""
    bindir = pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin or PATH); "
                    ".ci/run installs them with `apt-get install -y postgresql`")
    with postgres(bindir) as server:
        yield server
