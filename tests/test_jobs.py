"""Ray Jobs API and token authentication, for real: a local head (`ray start --head` on 127.0.0.1
with its dashboard, isolated RAY_TMPDIR) with RAY_AUTH_MODE=token, `ray job submit --working-dir .
-- python studies/negprior_shift.py ...` with the token and refused without it. (A local study under
Ray's default, token authentication on: tests/test_readme.py's walkthrough.)"""

import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, study_env
from ray_head import RAY, ray_head

from oodlab import stores

TINY = ["--epochs", "1", "--train-n", "300", "--test-n", "100"]


def _no_auth_env(ray_tmp: str, home: Path) -> dict:
    """A process that knows no token: no RAY_AUTH_* variables, a HOME without ~/.ray/auth_token."""
    env = {k: v for k, v in study_env(ray_tmp).items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH")}
    home.mkdir(parents=True, exist_ok=True)
    return {**env, "HOME": str(home)}


@pytest.mark.slow
def test_job_submit_with_the_token_runs_a_study_on_the_head(tmp_path, ray_tmp):
    token = tmp_path / "auth_token"  # what `ray get-auth-token --generate` writes to ~/.ray/auth_token
    token.write_text(secrets.token_hex(32))
    storage = tmp_path / "r"
    plain = _no_auth_env(ray_tmp, tmp_path / "home")
    env = {**plain, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the head's `python` is this one
    with ray_head(ray_tmp, dashboard=True, env=env) as head:
        job = ["--address", head.dashboard]
        # without the token: the Jobs API and the dashboard's REST API refuse
        refused = subprocess.run([RAY, "job", "list", *job], env=plain, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0, refused.stdout + refused.stderr
        try:
            urllib.request.urlopen(f"{head.dashboard}/api/jobs/", timeout=10)
            raise AssertionError("the dashboard answered without a token")
        except urllib.error.HTTPError as e:
            assert e.code == 401
        # with it (a browser gives it once on the dashboard's login page; scripts send the header)
        request = urllib.request.Request(f"{head.dashboard}/api/jobs/",
                                         headers={"Authorization": f"Bearer {token.read_text()}"})
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.status == 200
        out = subprocess.run([RAY, "job", "submit", *job, "--submission-id", "oodlab-job", "--working-dir", ".",
                              "--", "python", "studies/negprior_shift.py", "--storage", str(storage),
                              "--name", "viajob", "--shifts", "2", *TINY,
                              "--optuna-storage", f"journal://{storage}/optuna.log"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        status = subprocess.run([RAY, "job", "status", *job, "oodlab-job"], env=env, capture_output=True,
                                text=True, timeout=60)
        assert "Job 'oodlab-job' succeeded" in status.stdout + status.stderr, status.stdout + status.stderr
        logs = subprocess.run([RAY, "job", "logs", *job, "oodlab-job"], env=env, capture_output=True, text=True,
                              timeout=60).stdout
    # the driver ran on the head (Ray sets RAY_ADDRESS for a job), its progress is in the job's log
    assert "Ray: joined" in logs and "[oodlab] study viajob: 1 trials" in logs, logs[-3000:]
    assert "[1/1," in logs and "[oodlab] best " in logs, logs[-3000:]  # per-trial lines
    assert token.read_text() not in logs + out.stdout + out.stderr
    import optuna  # Optuna's journal file storage (the NFS choice) through a whole study

    journal = stores.optuna_storage(f"journal://{storage}/optuna.log")
    trials = optuna.load_study(study_name="viajob", storage=journal).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] and not (storage / "optuna.db").exists()
    assert (storage / "mlflow.db").exists() and len(list((storage / "ray" / "viajob").glob("trial_*"))) == 1
