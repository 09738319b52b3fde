"""Shared test setup: offline data root, no downloads, quiet local Ray; helpers for
tests that run real studies as subprocesses."""

import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("OODLAB_DATA_DIR", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("OODLAB_DOWNLOAD", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
if not (Path(os.environ["OODLAB_DATA_DIR"]) / "FashionMNIST" / "raw").is_dir():
    raise RuntimeError(
        f"offline data not found at OODLAB_DATA_DIR={os.environ['OODLAB_DATA_DIR']}; "
        "point it at a folder with the torchvision layout (e.g. ../shared/data)"
    )

# Under pytest-xdist each worker process gets its share of the cores for in-process torch work:
# two workers x two OpenMP threads on two cores made a 2 s trial test take 30 s next to a study.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


STORE_ENV = ("MLFLOW_TRACKING_URI", "OODLAB_OPTUNA_STORAGE")  # study defaults: a test passes stores as flags


def study_env(ray_tmp: str) -> dict:
    """Environment for a study subprocess whose Ray session lives under ``ray_tmp``; no store
    defaults leak in from the test process (``mlflow.set_tracking_uri`` exports its URI)."""
    env = {k: v for k, v in os.environ.items() if k not in STORE_ENV}
    return {**env, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(autouse=True)
def _restore_store_env():
    """``mlflow.set_tracking_uri`` sets $MLFLOW_TRACKING_URI for the whole process: undo it after each test."""
    saved = {k: os.environ.get(k) for k in STORE_ENV}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def kill_leftovers(ray_tmp: str, pgid: int | None = None) -> None:
    """Kill what a killed driver leaves behind: its process group and Ray's daemons, by pid."""
    if pgid is not None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                cmd = (proc / "cmdline").read_bytes().decode(errors="ignore")
                env = (proc / "environ").read_bytes().decode(errors="ignore")
            except OSError:
                continue
            if ray_tmp in cmd or f"RAY_TMPDIR={ray_tmp}" in env:
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def run_study(script: Path, *args: object, ray_tmp: str, timeout: float = 400) -> subprocess.CompletedProcess:
    """Run a study file to the end as a user would (``python studies/X.py ARGS``); output captured."""
    return subprocess.run([sys.executable, str(script), *map(str, args)], env=study_env(ray_tmp),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def study_main(script: Path, *argv: object) -> int:
    """A study file's own ``main`` in this process, on ``argv``: the exit code a user's ``python
    studies/X.py ARGS`` gets (argparse's exit included), without an interpreter start and an import
    of torch, Ray, Optuna and MLflow per call. For refusals only: a study that passes its checks
    starts Ray in the test process."""
    import importlib.util

    if script not in _STUDY_MODULES:
        spec = importlib.util.spec_from_file_location(f"study_{script.stem}", script)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _STUDY_MODULES[script] = module
    m = _STUDY_MODULES[script]
    try:
        return m.main(str(script), m.build, m.configure, [str(a) for a in argv])
    except SystemExit as e:  # argparse: a bad flag value
        return e.code if isinstance(e.code, int) else 1


_STUDY_MODULES: dict[Path, Any] = {}


def start_study(args: Sequence[object], ray_tmp: str) -> subprocess.Popen:
    """A study subprocess in its own session (so its process group can be killed), output piped."""
    return subprocess.Popen(list(map(str, args)), env=study_env(ray_tmp), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_until(proc: subprocess.Popen, ready: Callable[[], bool], what: str, timeout: float = 300) -> None:
    """Poll ``ready()`` while the study runs; fails with the study's output if it ended first."""
    def ready_while_running() -> bool:
        if ready():
            return True
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:] if proc.stdout else "study ended"
        return False

    wait_for(ready_while_running, what, timeout, interval=0.2)


def sigkill_when(proc: subprocess.Popen, ray_tmp: str, ready: Callable[[], bool], what: str,
                 timeout: float = 300) -> None:
    """Once ``ready()``, SIGKILL the driver (a crash mid-study) and whatever it left behind."""
    wait_until(proc, ready, what, timeout)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kill_leftovers(ray_tmp, proc.pid)


def tracking_server_watcher(port: int, state: Path, *mlflow_args: object) -> subprocess.Popen:
    """``python -m oodlab.tracking_server`` (what a cluster head runs): an MLflow server on ``port``
    kept up by its watcher; end it with ``end_group``."""
    return subprocess.Popen([sys.executable, "-m", "oodlab.tracking_server", "--port", str(port), "--state-dir",
                             str(state), "--interval", "1", "--failures", "2", "--start-grace", "240", "--",
                             "--workers", "1", *map(str, mlflow_args)],  # one worker: starts faster on 2 cores
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True)


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 240, interval: float = 0.5) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(interval)


def end_group(proc: subprocess.Popen) -> None:
    """SIGTERM a process started in its own session, and its children; SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def oodlab_cli(*args: object, timeout: float = 180) -> subprocess.CompletedProcess:
    """``oodlab ARGS`` as a user runs it (no store defaults from the test process)."""
    env = {k: v for k, v in os.environ.items() if k not in STORE_ENV}
    return subprocess.run([sys.executable, "-m", "oodlab.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env=env)


def oodlab_here(capsys: pytest.CaptureFixture[str], *args: object) -> subprocess.CompletedProcess:
    """``oodlab ARGS`` in this process (``cli.main``): the exit code and output a user gets, without
    an interpreter start per call; no store defaults from the test process, before or after."""
    from oodlab import cli

    saved = {k: os.environ.pop(k) for k in STORE_ENV if k in os.environ}
    capsys.readouterr()
    try:
        rc = cli.main([str(a) for a in args])
    finally:
        for k in STORE_ENV:
            os.environ.pop(k, None)
        os.environ.update(saved)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["oodlab", *map(str, args)], rc, out.out, out.err)


def optuna_states(db: Path) -> list[str]:
    """States of all Optuna trials in a storage file, read with sqlite3 (cheap to poll)."""
    if not db.exists():
        return []
    with sqlite3.connect(db) as c:
        try:
            return [r[0] for r in c.execute("select state from trials")]
        except sqlite3.OperationalError:
            return []


@pytest.fixture
def ray_tmp():
    d = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    yield d
    kill_leftovers(d)


def assert_reports_validation_and_test_metrics(cfg: Any, res: Any) -> None:
    """The validation protocol in a method's trial: every metric it names is reported; each
    validation OOD set has a ``val_`` AUROC per score in [0, 1]; ``val_id_{score}`` is the mean
    score of the ID validation images, of which there are ``test_n``."""
    import numpy as np

    from oodlab.experiment import is_val_metric, metric_name, val_id_name

    assert set(cfg.metric_names()) <= set(res.metrics)
    assert [k for k in res.metrics if is_val_metric(k)] and [k for k in res.metrics if k.startswith("auroc_")]
    for s in cfg.score_names():
        for v in cfg.val_ood:
            assert 0 <= res.metrics[metric_name("auroc", v, s, "val")] <= 1
        assert res.metrics[val_id_name(s)] == pytest.approx(float(np.mean(res.scores["val_id"][s])))
    assert {"id", "val_id"} <= set(res.scores) and len(res.scores["val_id"][cfg.score_names()[0]]) == cfg.test_n


def assert_resumes_exactly(make, tmp_path: Path, params=lambda e: e.model.parameters()):
    """A method's checkpoint is complete: 1 step (train + evaluate) + save + weights_only load
    + 1 epoch gives the same weights as 2 epochs straight. ``make()`` builds a fresh Experiment."""
    import torch

    a = make()
    for _ in range(2):  # what step() does, without the evaluation
        a.train_epoch()
        a.epoch += 1
    b = make()
    b.step()  # evaluation must not disturb training's RNG streams
    torch.save(b.state_dict(), tmp_path / "s.pt")
    c = make()
    c.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert c.epoch == 1
    c.train_epoch()
    for p, q in zip(params(a), params(c)):
        torch.testing.assert_close(p, q)
    return b, c


def pytest_collection_modifyitems(config, items):
    """Slow (whole-study) tests first: under `make test` (two xdist workers, handed one test at a
    time) both start on studies and end together on short tests, not one waiting on a late study."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
