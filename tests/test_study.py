"""Real studies through Ray Tune + Optuna + MLflow, run as users run them: as subprocesses.

The resume test SIGKILLs the driver mid-study and checks the outcome in all three
systems (Tune's trial folders, Optuna's storage, MLflow's runs), not ``can_restore``;
tests/test_postgres.py does the same for a grid study on PostgreSQL with checkpoints on
a separate path and a user's npz OOD set.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, optuna_states, sigkill_when, start_study, study_env, study_main

STUDY = REPO / "studies" / "negprior_shift.py"


@pytest.mark.slow
def test_gpu_request_without_gpus_fails_fast(tmp_path, ray_tmp, monkeypatch, capsys):
    """In process: the study's main starts a local Ray, finds no GPU, refuses and stops it."""
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    storage = tmp_path / "results"
    assert study_main(STUDY, "--smoke", "--storage", storage, "--gpus-per-trial", "0.5") == 2
    err = capsys.readouterr().err
    assert "GPUs" in err and "--gpus-per-trial 0" in err, err
    assert not storage.exists(), "a refused study must write nothing"


@pytest.mark.parametrize("flags,match", [
    (["--space", "shift=2..10"], "the grid sampler needs a list"),
    (["--space", "shift=10..2", "--sampler", "tpe"], "lo must be below hi"),
    (["--space", "epochs=1.5..3", "--sampler", "tpe"], "float range needs a float field"),
    (["--set", "epochs=many"], "not an integer"),
    (["--set", "shift"], "expected KEY=VALUE"),
    (["--scheduler", "asha"], "grid sampler needs one completed trial per grid point"),
    (["--target", "auroc_mnist_bpd"], "test-set metric"),
    (["--target", "val_nope", "--sampler", "tpe"], "is not reported"),
    (["--target", "auroc_mnist_bpd,val_id_bpd", "--mode", "max"], "--mode"),
    (["--sampler", "cmaes", "--target", "val_id_bpd,val_id_kl"], "single-objective"),
])
def test_bad_search_flags_are_refused(flags, match):
    """Flag checks of the shared search flags, in process (the exit-2 path is tested below)."""
    import runpy

    from oodlab.study import StudyError, parse_args, resolve, validate

    study = runpy.run_path(str(STUDY))
    args = parse_args(str(STUDY), study["configure"], ["--smoke", *flags])
    with pytest.raises(StudyError, match=re.escape(match)):
        validate(resolve(study["build"](args), args), args)


def test_search_flags_make_the_plan():
    import runpy

    from oodlab.space import Categorical, FloatRange
    from oodlab.study import parse_args, resolve

    study = runpy.run_path(str(STUDY))
    args = parse_args(str(STUDY), study["configure"], ["--smoke", "--sampler", "tpe", "--space", "shift=2..10",
                                                       "--set", "lr=3e-4", "--seeds", "2", "--scheduler", "asha"])
    plan = resolve(study["build"](args), args)
    assert plan.space == {"shift": FloatRange(2.0, 10.0), "neg_weight": FloatRange(0.1, 10.0, log=True)}
    assert plan.fixed["seeds"] == 2  # replicates inside each trial, not a searched dimension
    assert plan.fixed["lr"] == 3e-4 and "lr" not in plan.space and plan.num_samples == 2  # the smoke grid's size
    assert plan.targets == ("val_auroc_constant_bpd",) and plan.modes == ("max",) and plan.grace_period == 1
    grid = resolve(study["build"](args), parse_args(str(STUDY), study["configure"], ["--smoke", "--seeds", "2"]))
    assert grid.space == {"shift": Categorical((2.0, 8.0))} and grid.num_samples == 2
    other = parse_args(str(STUDY), study["configure"], ["--val-ood", "notmnist,constant"])
    assert resolve(study["build"](other), other).targets == ("val_auroc_notmnist_bpd",)  # follows --val-ood
    multi = parse_args(str(STUDY), study["configure"],
                       ["--sampler", "tpe", "--target", "val_auroc_blobs_bpd,val_id_bpd"])
    plan = resolve(study["build"](multi), multi)
    assert plan.multi and plan.modes == ("max", "min")


@pytest.mark.parametrize("flags,match", [
    (["--space", "bogus=1..2"], "unknown config key 'bogus'"),
    (["--ood", "bogus"], "unknown dataset"),
    (["--ood", "npz:/nonexistent/x.npz"], "/nonexistent/x.npz"),
    (["--id", "mnist"], "looked for"),  # offline MNIST has no train split
    (["--resume"], "run without --resume first"),
    (["--shifts", "-2"], "shift"),
    (["--epochs", "0"], "epochs"),
])
def test_bad_input_is_refused_before_compute(tmp_path, capsys, flags, match):
    """The study's own main, in process: exit 2, the reason on stderr, nothing written."""
    assert study_main(STUDY, "--smoke", "--storage", tmp_path / "r", *flags) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def _optuna_trials(db: Path, name: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}").trials


@pytest.mark.slow
def test_tpe_asha_sigkill_then_resume_keeps_history_and_rungs(tmp_path, ray_tmp):
    """TPE over a continuous shift with ASHA, two seeds in every trial: SIGKILL the driver once two
    trials have ended, resume; every trial exactly once in Optuna and MLflow (with its two seed runs),
    no epoch trained twice, ASHA's rungs still hold the trials that ended before the kill, stopped
    trials are PRUNED, and what Optuna and ASHA saw is the mean over the seeds."""
    storage, n = tmp_path / "results", 4
    args = [sys.executable, str(STUDY), "--storage", str(storage), "--name", "tpe", "--sampler", "tpe",
            "--scheduler", "asha", "--num-samples", str(n), "--space", "shift=2..10", "--set", "neg_weight=1",
            "--set", "lr=0.0003", "--set", "val_n=150", "--epochs", "3", "--train-n", "400", "--test-n", "100",
            "--seeds", "2"]
    ended = lambda: sum(s in ("COMPLETE", "PRUNED") for s in optuna_states(storage / "optuna.db"))
    sigkill_when(start_study(args, ray_tmp), ray_tmp, lambda: ended() >= 2, "two trials ended")
    before = {t.user_attrs.get("ray_trial_id") for t in _optuna_trials(storage / "optuna.db", "tpe")
              if t.state.name in ("COMPLETE", "PRUNED")}
    assert 2 <= len(before) < n, "the kill came too late to test resume"

    out = subprocess.run(args + ["--resume"], env=study_env(ray_tmp), capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    # Optuna: n trials ended, each Ray trial once, none left RUNNING; shifts are continuous.
    trials = _optuna_trials(storage / "optuna.db", "tpe")
    ended_trials = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(ended_trials) == n and not [t for t in trials if t.state.name == "RUNNING"]
    ray_ids = [t.user_attrs["ray_trial_id"] for t in ended_trials]
    assert len(set(ray_ids)) == n and before <= set(ray_ids)
    assert any(not float(t.params["shift"]).is_integer() for t in ended_trials)
    assert all(set(t.params) == {"shift"} for t in ended_trials)  # seeds are replicates, never searched
    pruned = [t for t in ended_trials if t.state.name == "PRUNED"]
    assert pruned, "ASHA stopped no trial"
    assert all(t.user_attrs["stopped_at_epoch"] < 3 and t.value is not None for t in pruned)

    # ASHA: the first rung holds every trial, those that ended before the kill included; the stops
    # it kept are Optuna's PRUNED trials, at the same epochs.
    saved = json.loads((storage / "asha" / "tpe.json").read_text())
    rungs = saved["rungs"][0]
    first_rung = dict(rungs[-1][1])
    assert rungs[-1][0] == 1 and set(first_rung) == set(ray_ids)
    assert saved["stopped"] == {t.user_attrs["ray_trial_id"]: t.user_attrs["stopped_at_epoch"] for t in pruned}

    # Tune: no epoch trained twice.
    for d in (storage / "ray" / "tpe").glob("trial_*"):
        trained = [json.loads(line)["epoch"] for line in (d / "result.json").read_text().splitlines()
                   if not json.loads(line).get("replayed")]
        assert len(trained) == len(set(trained)), (d.name, trained)

    # MLflow: one child per trial; validation and test metrics; stopped ones say where they stopped.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tpe")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("oodlab.role") == "trial"]
    lost = [r for r in runs if r.data.tags.get("oodlab.orphaned") == "true"]  # started, then lost by the kill
    assert all(r.info.status == "KILLED" and r.data.tags["ray_trial_id"] not in ray_ids for r in lost)
    children = [r for r in runs if r not in lost]
    assert sorted(r.data.tags["ray_trial_id"] for r in children) == sorted(ray_ids)
    stopped = {t.user_attrs["ray_trial_id"]: t.user_attrs["stopped_at_epoch"] for t in pruned}
    for r in children:  # FINISHED, also where Tune's saved state named a checkpoint deleted since (checkpoint_repair)
        assert r.info.status == "FINISHED", r.data.tags.get("oodlab.error", "")[-300:]
        assert any(k.startswith("val_auroc_") for k in r.data.metrics) and "auroc_mnist_bpd" in r.data.metrics
        tid = r.data.tags["ray_trial_id"]
        last = stopped.get(tid, 3)
        assert [m.step for m in client.get_metric_history(r.info.run_id, "loss")] == list(range(1, last + 1))
        assert (r.data.tags.get("oodlab.stopped_at_epoch") == str(last)) == (tid in stopped)
        seeds = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{r.info.run_id}'")
        assert sorted(s.data.tags["oodlab.seed"] for s in seeds) == ["0", "1"]
        assert {s.info.status for s in seeds} == {"FINISHED"}
        for s in seeds:  # each seed's epochs once, up to where the trial stopped
            assert [m.step for m in client.get_metric_history(s.info.run_id, "loss")] == list(range(1, last + 1))
        target = "val_auroc_constant_bpd"
        value = next(t.value for t in ended_trials if t.user_attrs["ray_trial_id"] == tid)
        assert value == pytest.approx(np.mean([s.data.metrics[target] for s in seeds]), abs=1e-6)
        assert r.data.metrics[target] == pytest.approx(value, abs=1e-6)
    parent = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("oodlab.role") == "parent")
    assert parent.info.status == "FINISHED" and parent.data.tags["oodlab.target"].startswith("val_")
    assert "search/optimization_history.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
