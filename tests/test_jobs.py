"""Ray Jobs API, for real: `ray job submit --working-dir . -- python studies/negprior_shift.py ...`
against a local head (`ray start --head` on 127.0.0.1 with its dashboard, isolated RAY_TMPDIR)."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import study_env
from ray_head import RAY, ray_head

from oodlab import stores

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_job_submit_runs_a_study_on_the_head(tmp_path, ray_tmp):
    storage = tmp_path / "r"
    env = {k: v for k, v in study_env(ray_tmp).items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the head's `python` is this one
    with ray_head(ray_tmp, dashboard=True, env=env) as head:
        job = ["--address", head.dashboard]
        out = subprocess.run([RAY, "job", "submit", *job, "--submission-id", "oodlab-job", "--working-dir", ".",
                              "--", "python", "studies/negprior_shift.py", "--storage", str(storage),
                              "--name", "viajob", "--shifts", "2,4", "--epochs", "1", "--train-n", "300",
                              "--test-n", "100", "--optuna-storage", f"journal://{storage}/optuna.log"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        status = subprocess.run([RAY, "job", "status", *job, "oodlab-job"], env=env, capture_output=True,
                                text=True, timeout=60)
        assert "Job 'oodlab-job' succeeded" in status.stdout + status.stderr, status.stdout + status.stderr
        logs = subprocess.run([RAY, "job", "logs", *job, "oodlab-job"], env=env, capture_output=True, text=True,
                              timeout=60).stdout
    # the driver ran on the head (Ray sets RAY_ADDRESS for a job), its progress is in the job's log
    assert "Ray: joined" in logs and "[oodlab] study viajob: 2 trials" in logs, logs[-3000:]
    assert "[1/2," in logs and "[2/2," in logs and "[oodlab] best " in logs, logs[-3000:]  # per-trial lines
    import optuna  # Optuna's journal file storage (the NFS choice) through a whole study

    journal = stores.optuna_storage(f"journal://{storage}/optuna.log")
    trials = optuna.load_study(study_name="viajob", storage=journal).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"] and not (storage / "optuna.db").exists()
    assert (storage / "mlflow.db").exists() and len(list((storage / "ray" / "viajob").glob("trial_*"))) == 2
