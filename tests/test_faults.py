"""Fault tolerance and bad input, for real: diverging trials, a worker killed on a multi-node
cluster (ray.cluster_utils.Cluster), corrupt or foreign state, unusable stores. (Ctrl-C and
SIGKILL of the driver, then --resume: tests/test_postgres.py and tests/test_study.py.)"""

import json
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO, optuna_states, run_study, start_study, study_main

STUDY = REPO / "studies" / "negprior_shift.py"
TINY = ["--epochs", "3", "--train-n", "600", "--test-n", "100"]

# A study file whose grid has one trial that diverges at epoch 2 (fail_at_epoch).
NAN_STUDY = textwrap.dedent("""
    import sys
    from oodlab.runner import main
    from oodlab.study import StudySpec, common_overrides, val_metric
    def configure(p): pass
    def build(args):
        fixed = dict(epochs=2, train_n=300, test_n=100, val_n=100, **common_overrides(args))
        return StudySpec(name=args.name or "nan", fixed=fixed, space={"fail_at_epoch": [None, 2]},
                         metric=val_metric(fixed, "auroc", "bpd"))
    if __name__ == "__main__":
        sys.exit(main(__file__, build, configure))
""")


def _run(args, ray_tmp, timeout=300):
    return run_study(args[0], *args[1:], ray_tmp=ray_tmp, timeout=timeout)


def _epochs(trial_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (trial_dir / "result.json").read_text().splitlines()]


@pytest.mark.slow
def test_diverging_trial_fails_with_reason_and_study_goes_on_then_bad_state_is_refused(tmp_path, ray_tmp, capsys):
    """One study (a trial that diverges at epoch 2, one that finishes), then the resume checks on
    its state: a corrupt checkpoint and a foreign folder are refused, exit 2, before Ray starts."""
    script = tmp_path / "nan_study.py"
    script.write_text(NAN_STUDY)
    out = _run([script, "--storage", tmp_path / "r"], ray_tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    _diverged_trial_failed_and_the_other_finished(tmp_path)

    states = sorted((tmp_path / "r" / "ray" / "nan").glob("trial_*/checkpoint_*/state.pt"))
    for state in states:  # no readable checkpoint left in any trial
        state.write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert study_main(script, "--storage", tmp_path / "r", "--resume") == 2  # in process: refused before Ray
    err = capsys.readouterr().err
    assert "cannot be loaded" in err and any(str(s) in err for s in states), err
    (tmp_path / "r" / "ray" / "foreign").mkdir()
    assert study_main(script, "--storage", tmp_path / "r", "--name", "foreign", "--resume") == 2
    assert "no Ray Tune experiment state" in capsys.readouterr().err


def _diverged_trial_failed_and_the_other_finished(tmp_path):
    import optuna
    from mlflow.tracking import MlflowClient

    study = optuna.load_study(study_name="nan", storage=f"sqlite:///{tmp_path / 'r' / 'optuna.db'}")
    by_param = {t.params["fail_at_epoch"]: t for t in study.trials}
    assert by_param[None].state.name == "COMPLETE"
    assert by_param[2].state.name == "FAIL" and "nan" in by_param[2].user_attrs["error"]
    assert by_param[2].user_attrs["ray_trial_id"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'r' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("nan").experiment_id], "tags.`oodlab.role` = 'trial'")
    status = {r.data.params["fail_at_epoch"]: (r.info.status, r.data.tags.get("oodlab.error", "")) for r in runs}
    assert status["None"][0] == "FINISHED"
    assert status["2"][0] == "FAILED" and "epoch 2" in status["2"][1]
    # the failed trial ran epoch 1 only: no retry of a deterministic divergence
    assert [
        m.step
        for m in client.get_metric_history(
            next(r.info.run_id for r in runs if r.data.params["fail_at_epoch"] == "2"), "loss"
        )
    ] == [1]


@pytest.mark.slow
def test_worker_killed_mid_trial_restarts_from_checkpoint(tmp_path, ray_tmp, monkeypatch):
    """Two Ray nodes in one machine; the worker of a running trial is SIGKILLed after its
    first epoch; the trial restarts on a fresh worker from its checkpoint, not from epoch 1."""
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        args = [sys.executable, STUDY, "--storage", tmp_path / "r", "--name", "kill", "--shifts", "2,8",
                "--epochs", "3", "--train-n", "600", "--test-n", "100", "--address", cluster.address]
        proc = start_study(args, ray_tmp)
        exp = tmp_path / "r" / "ray" / "kill"
        deadline, victim = time.time() + 180, None
        while victim is None:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-3000:]
            for d in exp.glob("trial_*"):
                if (d / "result.json").exists() and (d / "result.json").read_text().strip():
                    last = json.loads((d / "result.json").read_text().splitlines()[-1])
                    if last["epoch"] < 3:
                        victim = (d, last["pid"], last["epoch"])
                        break
            time.sleep(0.1)
        import os

        os.kill(victim[1], signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out.decode()[-3000:]
        rows = [json.loads(line) for line in (victim[0] / "result.json").read_text().splitlines()]
        assert rows[-1]["epoch"] == 3
        # the restarted run began from the checkpoint of the last reported epoch, not from scratch,
        # first replaying that epoch's report to Tune, and trained every epoch once
        assert rows[-1]["start_epoch"] >= victim[2] >= 1, rows[-1]["start_epoch"]
        replays = [r for r in rows if r.get("replayed")]
        assert [r["epoch"] for r in replays] == [rows[-1]["start_epoch"]], rows
        trained = [r["epoch"] for r in rows if not r.get("replayed")]
        assert trained == list(range(1, 4)), trained
        assert optuna_states(tmp_path / "r" / "optuna.db").count("COMPLETE") == 2
    finally:
        cluster.shutdown()


@pytest.mark.parametrize("flags,match", [
    (["--storage", "/etc/passwd/results"], "not a writable directory"),
    (["--mlflow-uri", "http://127.0.0.1:9"], "cannot reach the MLflow tracking store"),
    (["--gpus-per-trial", "1.5"], "whole number"),
    (["--decoder", "laplace"], "decoder must be one of"),
    (["--sampler", "annealing"], "invalid choice"),
    (["--arch", "color"], "color architecture needs 32×32"),  # color model on 28×28 gray data
    (["--ood", "uniform_noise[channels=3,size=32]"], "shape"),  # OOD set that does not fit the ID set
    (["--epochs", "two"], "invalid int value"),
])
def test_unusable_stores_and_bad_flags_are_refused(tmp_path, capsys, flags, match):
    """In process (tests/test_check_data.py runs one refusal as a user would, as a subprocess)."""
    assert study_main(STUDY, "--smoke", "--storage", tmp_path / "r", *flags) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_restore_takes_the_newest_readable_checkpoint(tmp_path):
    """Tune's saved state may point at an older checkpoint than the trial wrote before a kill."""
    import torch
    from ray import tune

    from oodlab.registry import build
    from oodlab.trainable import STATE_FILE, restore

    cfg = dict(train_n=100, test_n=20, epochs=3, device="cpu")
    exp = build(cfg)
    for k in range(2):  # checkpoint_000000 (epoch 1), checkpoint_000001 (epoch 2)
        exp.train_epoch()
        exp.epoch += 1
        (tmp_path / f"checkpoint_00000{k}").mkdir()
        torch.save(exp.state_dict(), tmp_path / f"checkpoint_00000{k}" / STATE_FILE)
    (tmp_path / "checkpoint_000002").mkdir()
    (tmp_path / "checkpoint_000002" / STATE_FILE).write_bytes(b"\x80partial")  # cut short by the kill
    fresh = build(cfg)
    used = restore(fresh, tune.Checkpoint.from_directory(str(tmp_path / "checkpoint_000000")))
    assert used.path.endswith("checkpoint_000001") and fresh.epoch == 2
    for p, q in zip(exp.model.parameters(), fresh.model.parameters()):
        torch.testing.assert_close(p, q)
