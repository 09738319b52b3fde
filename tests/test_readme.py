"""Every command in README.md runs as written from a fresh clone.

The commands are the lines of README's ```bash blocks (continuations joined, comments dropped).
Each is checked by the first rule that matches it; a command no rule covers fails the test, so a
new README command comes with its check:

* ``make T``: ``make -n T`` (the targets build the venv or run this suite itself);
* the set-up line: run as written in bash, then ``oodlab`` must be the checkout's venv;
* a study (``python studies/X.py …``, ``oodlab run X …``): trains for minutes to hours, so its
  flags go through the study's own parser, ``resolve`` and ``validate``, everything a study checks
  before Ray starts (flags, search space, data); the smoke study also runs for real below;
* ``oodlab list/report/export/ui``: run as written in the slow walkthrough, in a fresh folder,
  after the smoke study (``ui`` is served, fetched over HTTP and stopped; a busy port is swapped).
"""

from __future__ import annotations

import os
import re
import runpy
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, study_env

README = REPO / "README.md"
WALKTHROUGH = "## One study, from start to the MLflow UI"


def bash_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(section heading, commands) of each ```bash block: continuations joined, comments dropped."""
    out, heading = [], ""
    for m in re.finditer(r"^(## [^\n]*)$|^```bash\n(.*?)^```", text, re.M | re.S):
        if m.group(1):
            heading = m.group(1)
            continue
        cmds = []
        for line in m.group(2).replace("\\\n", " ").splitlines():
            cmd = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            if cmd:
                cmds.append(re.sub(r"\s+", " ", cmd))
        out.append((heading, cmds))
    return out


def commands() -> list[str]:
    return [c for _, cmds in bash_blocks(README.read_text()) for c in cmds]


def study_argv(cmd: str) -> tuple[Path, list[str]] | None:
    """(study file, flags) of a command that runs a study, else None."""
    words = shlex.split(cmd)
    if words[:1] == ["python"] and len(words) > 1 and words[1].startswith("studies/"):
        return REPO / words[1], words[2:]
    if words[:2] == ["oodlab", "run"]:
        return REPO / "studies" / f"{words[2]}.py", words[3:]
    return None


def check_study_flags(script: Path, argv: list[str]) -> None:
    """What a study checks before Ray starts: its parser, the plan, flags against the plan and the data."""
    from oodlab.study import parse_args, resolve, validate

    study = runpy.run_path(str(script))
    args = parse_args(str(script), study["configure"], argv)
    validate(resolve(study["build"](args), args), args)


def test_readme_is_short_and_its_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert links and not [link for link in links if not link.startswith("http") and not (REPO / link).exists()]


def test_every_readme_command_has_a_check_and_passes_it(tmp_path):
    """make targets, the set-up line and every study's flags; oodlab's subcommands need a study
    and run in the walkthrough below."""
    cmds = commands()
    assert len(cmds) >= 10, cmds
    unchecked = []
    for cmd in cmds:
        words = shlex.split(cmd)
        if words[0] == "make":
            out = subprocess.run(["make", "-n", *words[1:]], cwd=REPO, capture_output=True, text=True)
            assert out.returncode == 0, (cmd, out.stderr)
        elif words[0] == "export" and "source .venv/bin/activate" in cmd:
            out = subprocess.run(["bash", "-c", f"{cmd} && command -v oodlab"], cwd=REPO, capture_output=True,
                                 text=True)
            assert out.returncode == 0 and out.stdout.strip() == str(REPO / ".venv" / "bin" / "oodlab"), out
        elif (study := study_argv(cmd)) is not None:
            check_study_flags(*study)
        elif words[:2] in (["oodlab", "list"], ["oodlab", "report"], ["oodlab", "export"], ["oodlab", "ui"]):
            pass  # run in test_walkthrough_runs_as_written
        else:
            unchecked.append(cmd)
    assert not unchecked, f"README commands without a check in tests/test_readme.py: {unchecked}"


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_then_stop(cmd: str, cwd: Path, env: dict[str, str]) -> None:
    """Start ``oodlab ui …``, fetch its page, stop it; a busy port is swapped for a free one."""
    words = shlex.split(cmd)
    port = int(words[words.index("--port") + 1]) if "--port" in words else 5000
    if not _free(port):
        words = [w for i, w in enumerate(words) if w != "--port" and (i == 0 or words[i - 1] != "--port")]
        port = _free_port()
        words += ["--port", str(port)]
    proc = subprocess.Popen(words, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:] if proc.stdout else cmd
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.time() < deadline, f"{cmd}: no page within 120 s"
                time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_walkthrough_runs_as_written(tmp_path, ray_tmp):
    """README's study walkthrough, then every oodlab list/report/export/ui command of README, as
    written, in a fresh folder (the checkout's studies/ linked in). A report of a study that only a
    long run makes must get as far as looking the study up: exit 2, "no study", no usage error.
    Ray's own defaults, as a newcomer has them: no RAY_AUTH_MODE, so the local Ray a study starts
    switches token authentication on and makes a token in a HOME that had none."""
    (tmp_path / "studies").symlink_to(REPO / "studies")
    home = tmp_path / "home"
    home.mkdir()
    env = {**{k: v for k, v in study_env(ray_tmp).items() if not k.startswith("RAY_AUTH")}, "HOME": str(home),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    blocks = bash_blocks(README.read_text())
    walkthrough = [c for heading, cmds in blocks if heading == WALKTHROUGH for c in cmds]
    assert walkthrough and walkthrough[0].startswith("python studies/"), walkthrough
    others = [c for heading, cmds in blocks if heading != WALKTHROUGH for c in cmds
              if shlex.split(c)[:2] in (["oodlab", "list"], ["oodlab", "report"], ["oodlab", "export"],
                                         ["oodlab", "ui"])]
    made = {"negprior_shift-smoke"}
    for cmd in walkthrough + others:
        words = shlex.split(cmd)
        if words[:2] == ["oodlab", "ui"]:
            _serve_then_stop(cmd, tmp_path, env)
            continue
        out = subprocess.run([sys.executable, *words[1:]] if words[0] == "python" else words, cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=400)
        if words[1] in ("report", "export") and words[2] not in made:
            assert out.returncode == 2 and "usage:" not in out.stderr and "no study" in out.stderr, (cmd, out)
            continue
        assert out.returncode == 0, (cmd, out.stdout[-2000:], out.stderr[-2000:])
        if words[0] == "python":
            assert "browse: oodlab ui --storage" in out.stdout + out.stderr
        elif words[1] == "report":
            assert "selected by `val_auroc_constant_bpd` (max)" in out.stdout, out.stdout
        elif words[1] == "list":
            assert re.search(r"^negprior_shift-smoke\s+2\s", out.stdout, re.M), out.stdout
    assert any(shlex.split(c)[:2] == ["oodlab", "export"] for c in others)
    token = home / ".ray" / "auth_token"
    assert token.is_file() and token.stat().st_size > 16, "Ray did not switch token authentication on"
    assert (tmp_path / "export" / "mlflow.db").exists()
    # What the walkthrough promises in MLflow: each trial's figures and scores, the method's own
    # (negprior's samples.png) included, and the report on the study's parent run.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'oodlab-results' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("negprior_shift-smoke").experiment_id])
    trials = [r for r in runs if r.data.tags.get("oodlab.role") == "trial"]
    assert len(trials) == 2 and {r.info.status for r in trials} == {"FINISHED"}
    for r in trials:
        files = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"roc.png", "scores_hist.png", "scores.npz", "metrics.json", "samples.png"} <= files, files
    parent = next(r for r in runs if r.data.tags.get("oodlab.role") == "parent")
    assert {"report.md", "selection.md"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
