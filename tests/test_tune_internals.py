"""The private Ray Tune / Optuna API that oodlab.tune_internals relies on is still there, and
ASHA's rungs survive a restart through their state file. Fast: no Ray cluster is started."""

from types import SimpleNamespace

import optuna

from oodlab import tune_internals


def test_private_api_still_exists():
    tune_internals.check_private_api()  # fails loudly, naming the attribute, after an upgrade renames one


def _trial(tid):
    return SimpleNamespace(trial_id=tid)  # ASHA reads only the id of a trial


def test_asha_rungs_survive_a_new_scheduler(tmp_path):
    state = tmp_path / "asha.json"
    make = lambda: tune_internals.persistent_asha(state, time_attr="epoch", metric="m", mode="max", max_t=4,
                                                  grace_period=1, reduction_factor=2)
    a = make()
    for tid, value in (("t1", 0.8), ("t2", 0.9)):
        a.on_trial_add(None, _trial(tid))
        assert a.on_trial_result(None, _trial(tid), {"epoch": 1, "m": value}) == "CONTINUE"
    rungs = tune_internals.asha_rungs(state)
    assert rungs[0][-1] == [1, {"t1": 0.8, "t2": 0.9}]  # milestone 1 recorded both

    b = make()  # a resumed driver: fresh scheduler, same file
    b.on_trial_add(None, _trial("t3"))
    assert b.on_trial_result(None, _trial("t3"), {"epoch": 1, "m": 0.1}) == "STOP"  # below the restored cutoff
    fresh = tune_internals.persistent_asha(tmp_path / "other.json", time_attr="epoch", metric="m", mode="max",
                                           max_t=4, grace_period=1, reduction_factor=2)
    fresh.on_trial_add(None, _trial("t3"))
    assert fresh.on_trial_result(None, _trial("t3"), {"epoch": 1, "m": 0.1}) == "CONTINUE"  # empty rungs: no cutoff

    # t3 was stopped at epoch 1; a driver killed before Tune saved that restores t3 as unfinished,
    # and its trainable replays the epoch-1 report: the next scheduler ends it there.
    c = make()
    c.on_trial_add(None, _trial("t3"))
    assert c.on_trial_result(None, _trial("t3"), {"epoch": 1, "m": 0.1, "replayed": 1}) == "STOP"
    c.on_trial_add(None, _trial("t4"))
    assert c.on_trial_result(None, _trial("t4"), {"epoch": 1, "m": 0.95}) == "CONTINUE"  # only t3


def test_reconcile_marks_orphans_failed_and_frees_grid_points(tmp_path):
    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = optuna.create_study(study_name="s", storage=url,
                                sampler=optuna.samplers.GridSampler({"x": [1, 2]}, seed=0))
    kept, orphan = study.ask(), study.ask()
    assert tune_internals.reconcile_optuna(url, "s", keep={kept.number}) == 1
    states = {t.number: t.state for t in optuna.load_study(study_name="s", storage=url).trials}
    assert states == {kept.number: optuna.trial.TrialState.RUNNING, orphan.number: optuna.trial.TrialState.FAIL}
    assert tune_internals.reconcile_optuna(url, "missing") == 0


def test_searcher_never_tells_optuna_twice(tmp_path):
    """The SIGKILL window: Optuna recorded a trial as COMPLETE, Tune's saved searcher state
    predates it; on resume the trial completes again and must not be told twice."""
    from oodlab.space import DefineByRun, as_space

    url = f"sqlite:///{tmp_path / 'o.db'}"
    make = lambda: tune_internals.searcher_class()(space=DefineByRun.of(as_space({"x": [1, 2]})), metric="m",
                                                   mode="max", study_name="s", storage=optuna.storages.RDBStorage(url))
    first = make()
    assert first.suggest("t1")["x"] in (1, 2)
    first.save(str(tmp_path / "searcher.pkl"))  # the state Tune saved before the kill
    first.on_trial_result("t1", {"m": 0.5, "epoch": 1})
    first.on_trial_complete("t1", {"m": 0.7})
    resumed = make()
    resumed.restore(str(tmp_path / "searcher.pkl"))
    resumed.on_trial_result("t1", {"m": 0.7, "epoch": 2})  # would raise UpdateFinishedTrialError
    resumed.on_trial_complete("t1", {"m": 0.7})
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert [(t.state.name, t.value, t.user_attrs["ray_trial_id"]) for t in trials] == [("COMPLETE", 0.7, "t1")]


def test_a_replayed_report_reaches_optuna_once(tmp_path, recwarn):
    """A restored trial replays its last report: Optuna takes the epoch if the driver died before
    telling it, and is not told it again (no "already reported" warning) if it had it."""
    from oodlab.space import DefineByRun, as_space

    url = f"sqlite:///{tmp_path / 'o.db'}"
    searcher = tune_internals.searcher_class()(space=DefineByRun.of(as_space({"x": [1, 2]})), metric="m",
                                               mode="max", study_name="s", storage=optuna.storages.RDBStorage(url))
    searcher.suggest("t1")
    searcher.on_trial_result("t1", {"m": 0.5, "epoch": 1})
    searcher.on_trial_result("t1", {"m": 0.5, "epoch": 1, "replayed": 1})  # had it
    searcher.on_trial_result("t1", {"m": 0.6, "epoch": 2, "replayed": 1})  # never told before the crash
    (trial,) = optuna.load_study(study_name="s", storage=url).trials
    assert trial.intermediate_values == {1: 0.5, 2: 0.6}
    assert not [w for w in recwarn if "already reported" in str(w.message)]


def _trial_with_checkpoints(folder, names, latest):
    from ray import tune
    from ray.train._internal.session import _TrainingResult
    from ray.tune.experiment import Trial

    trial = Trial("train", stub=True)
    for n in names:
        (folder / n).mkdir(parents=True)
        result = _TrainingResult(checkpoint=tune.Checkpoint(str(folder / n)), metrics={"epoch": int(n[-1]) + 1})
        trial.run_metadata.checkpoint_manager.register_checkpoint(result)
    trial.run_metadata.checkpoint_manager._latest_checkpoint_result = _TrainingResult(
        checkpoint=tune.Checkpoint(str(folder / latest)), metrics={})
    return trial


def test_a_restored_trial_whose_checkpoint_is_gone_resumes_from_the_newest_left(tmp_path):
    """Tune's saved state names checkpoint_000000, which num_to_keep deleted after the save."""
    trial = _trial_with_checkpoints(tmp_path, ["checkpoint_000000", "checkpoint_000001", "checkpoint_000002"],
                                    latest="checkpoint_000000")
    (tmp_path / "checkpoint_000000").rmdir()
    tune_internals.checkpoint_repair().on_step_begin(0, [trial])
    assert trial.checkpoint.path.endswith("checkpoint_000002")
    kept = [r.checkpoint.path for r in trial.run_metadata.checkpoint_manager._checkpoint_results]
    assert not any(p.endswith("checkpoint_000000") for p in kept)


def test_a_restored_trial_with_no_checkpoint_left_starts_over_and_an_intact_one_is_left_alone(tmp_path):
    gone = _trial_with_checkpoints(tmp_path / "a", ["checkpoint_000000"], latest="checkpoint_000000")
    (tmp_path / "a" / "checkpoint_000000").rmdir()
    intact = _trial_with_checkpoints(tmp_path / "b", ["checkpoint_000000", "checkpoint_000001"],
                                     latest="checkpoint_000000")
    tune_internals.checkpoint_repair().on_step_begin(0, [gone, intact])
    assert gone.checkpoint is None
    assert intact.checkpoint.path.endswith("checkpoint_000000")  # exists: Tune's choice stands
