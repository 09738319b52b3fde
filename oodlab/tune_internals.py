"""The one module that touches private Ray Tune / Optuna attributes; nothing else may.

Why each is needed:

* ``OptunaSearch._ot_trials`` / ``_ot_study`` / ``_completed_trials``: the searcher must
  never tell Optuna twice (a driver killed after Optuna recorded a trial or an epoch's
  value but before Tune saved its state sees that trial finish, or its epoch replayed,
  again on resume), must record the Ray trial id
  and a failure's reason on the Optuna trial, and must tell Optuna PRUNED for a trial the
  scheduler stopped early (Ray would tell COMPLETE with the value at the stopping epoch).
* ``Study._storage`` / ``FrozenTrial._trial_id``: reconcile trials Tune will never finish.
* ``searcher-state-*.pkl`` (OptunaSearch's pickled ``__dict__``): which Optuna trials a
  restored Tune experiment still tracks.
* ``AsyncHyperBandScheduler._brackets`` / ``_Bracket._rungs``: Tune does not save the
  scheduler with its experiment state (``TuneController.save_to_dir``), so a resumed ASHA
  would start with empty rungs; ``PersistentASHA`` keeps them (and the trials it stopped) in a
  JSON file. ``_time_attr`` / ``_max_t``: whether a stop came before the last epoch.
* ``Trial.run_metadata.checkpoint_manager`` (``_latest_checkpoint_result`` /
  ``_checkpoint_results``): Tune's saved state can name a checkpoint that
  ``CheckpointConfig(num_to_keep)`` deleted after the save (fast epochs, a driver killed
  before the next save); Ray's ``Trainable.restore`` then raises before the trainable runs,
  so ``CheckpointRepair`` points such a trial at the newest checkpoint left in its folder.

``check_private_api`` asserts every attribute exists, so an upgrade that renames one fails
a fast test (tests/test_tune_internals.py) instead of a study.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any

from oodlab import tags

log = logging.getLogger(__name__)
SEARCHER_STATE_GLOB = "searcher-state-*.pkl"  # Searcher.CKPT_FILE_TMPL in Tune's experiment folder


def check_private_api() -> None:
    """Raise AssertionError naming any private attribute this module relies on that is gone."""
    import optuna
    from ray.tune.schedulers.async_hyperband import AsyncHyperBandScheduler, _Bracket
    from ray.tune.search.optuna import OptunaSearch

    def space(t: Any) -> None:
        t.suggest_float("x", 0, 1)

    s = OptunaSearch(space=space, metric="m", mode="max")
    for attr in ("_ot_trials", "_ot_study", "_completed_trials", "_metric"):
        assert hasattr(s, attr), f"ray OptunaSearch lost {attr}"
    assert hasattr(s._ot_study, "_storage"), "optuna Study lost _storage"
    st = optuna.create_study()
    st.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert hasattr(st.trials[0], "_trial_id"), "optuna FrozenTrial lost _trial_id"
    for name in ("set_trial_system_attr", "set_trial_state_values", "set_trial_user_attr", "get_trial"):
        assert hasattr(st._storage, name), f"optuna storage lost {name}"
    sched = AsyncHyperBandScheduler(metric="m", mode="max", max_t=4, grace_period=1, reduction_factor=2)
    assert isinstance(sched._brackets[0], _Bracket) and isinstance(sched._brackets[0]._rungs, list)
    milestone, recorded = sched._brackets[0]._rungs[0]
    assert isinstance(recorded, dict) and milestone == 4
    assert (sched._time_attr, sched._max_t) == ("training_iteration", 4), "ray ASHA lost _time_attr/_max_t"
    from ray.tune.search import Searcher

    assert Searcher.CKPT_FILE_TMPL.format("*") == SEARCHER_STATE_GLOB, "Tune renamed its searcher-state file"
    from ray.tune.experiment import Trial

    manager = Trial("x", stub=True).run_metadata.checkpoint_manager
    for attr in ("_latest_checkpoint_result", "_checkpoint_results"):
        assert hasattr(manager, attr), f"ray _CheckpointManager lost {attr}"


# ---------------------------------------------------------------- the searcher


def searcher_class() -> type:
    """OptunaSearch that records the Ray trial id and failure reasons on Optuna trials, tells
    Optuna PRUNED for trials stopped before ``max_epoch``, and never tells Optuna twice."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class Searcher(OptunaSearch):
        def __init__(self, *args: Any, max_epoch: int | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.max_epoch = max_epoch

        @property
        def study(self) -> Any:
            return self._ot_study

        def _stored(self, trial_id: str) -> Any:
            """The Optuna trial as its storage holds it now (None for a trial this searcher did not ask)."""
            ot = self._ot_trials.get(trial_id)
            return None if ot is None else self.study._storage.get_trial(ot._trial_id)

        def _finished_in_optuna(self, trial_id: str) -> bool:
            stored = self._stored(trial_id)
            return stored is not None and stored.state.is_finished()

        def _report(self, trial_id: str, result: dict, stored: Any = None) -> None:
            """The target at this epoch as Optuna's intermediate value (steps = epochs, not Tune's
            iterations), once: a restored trial replays a report Optuna may have had before the crash."""
            value = result.get(self._metric) if isinstance(self._metric, str) else None
            ot = self._ot_trials.get(trial_id)
            if ot is None or not isinstance(value, (int, float)) or value != value or "epoch" not in result:
                return
            step = int(result["epoch"])
            if step not in (stored or self._stored(trial_id)).intermediate_values:
                ot.report(float(value), step)

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            stored = self._stored(trial_id)
            if trial_id in self._completed_trials or stored is None or stored.state.is_finished():
                return
            self._report(trial_id, result, stored)  # multi-objective: Optuna takes no intermediate values; skipped

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id in self._completed_trials:
                return
            if self._finished_in_optuna(trial_id):
                self._completed_trials.add(trial_id)
                return
            ot = self._ot_trials.get(trial_id)
            if ot is not None:
                storage, tid = self.study._storage, ot._trial_id
                storage.set_trial_user_attr(tid, tags.TRIAL, trial_id)
                reason = (result or {}).get("error") or (
                    f"trial errored (see MLflow tag {tags.ERROR})" if error else None)
                if reason:
                    storage.set_trial_user_attr(tid, tags.OPTUNA_ERROR, str(reason)[:2000])
                epoch = (result or {}).get("epoch")
                if not error and not (result or {}).get("error") and self.max_epoch and epoch \
                        and epoch < self.max_epoch:
                    storage.set_trial_user_attr(tid, "stopped_at_epoch", int(epoch))
                    self._report(trial_id, result or {})  # the value it was stopped with
                    # PRUNED (value = last intermediate): TPE ranks it by that value, CMA-ES and random skip it
                    self.study.tell(ot, state=optuna.trial.TrialState.PRUNED)
                    self._completed_trials.add(trial_id)
                    return
            super().on_trial_complete(trial_id, result=result, error=error)

    return Searcher


def known_optuna_trials(exp_dir: Path) -> set[int] | None:
    """Optuna trial numbers that Tune's saved searcher state tracks (None if none saved)."""
    states = sorted(exp_dir.glob(SEARCHER_STATE_GLOB), key=lambda p: p.stat().st_mtime)
    if not states:
        return None
    with open(states[-1], "rb") as f:
        saved = pickle.load(f)
    return {t.number for t in saved.get("_ot_trials", {}).values()}


def reconcile_optuna(storage: Any, study: str, keep: set[int] | None = None) -> int:
    """Mark RUNNING Optuna trials that Tune will never finish as FAIL; returns how many.

    A driver killed between Optuna's ``ask`` and Tune's state save leaves such orphans;
    left RUNNING they would also block their grid point. ``keep``: numbers Tune resumes.
    """
    import optuna

    try:
        s = optuna.load_study(study_name=study, storage=storage)
    except KeyError:
        return 0
    stale = [t for t in s.get_trials(deepcopy=False)
             if t.state == optuna.trial.TrialState.RUNNING and t.number not in (keep or set())]
    for t in stale:
        if "grid_id" in t.system_attrs:  # free its grid point: GridSampler counts FAIL as visited, and
            # Optuna has no public call that un-visits one, so this stays a private storage call
            s._storage.set_trial_system_attr(t._trial_id, "grid_id", -1)
        s.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    return len(stale)


# ---------------------------------------------------------------- checkpoints Tune's state lost


def checkpoint_repair() -> Any:
    """A Tune callback that, before a restored experiment starts its trials, points every
    unfinished trial whose saved checkpoint is gone at the newest checkpoint in its folder
    (or at none: the trial starts over). Without it Ray fails the trial on restore."""
    from ray import tune
    from ray.train._internal.session import _TrainingResult
    from ray.train._internal.storage import _exists_at_fs_path

    from oodlab.trainable import newest_checkpoints

    def exists(c: Any) -> bool:
        return bool(_exists_at_fs_path(c.filesystem, c.path))

    class CheckpointRepair(tune.Callback):
        def __init__(self) -> None:
            self.checked: set[str] = set()

        def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
            for trial in trials:
                if trial.trial_id in self.checked or trial.status in ("TERMINATED", "ERROR"):
                    continue
                self.checked.add(trial.trial_id)
                latest = trial.run_metadata.checkpoint_manager.latest_checkpoint_result
                if latest is None or exists(latest.checkpoint):
                    continue
                repair(trial, latest)

    def repair(trial: Any, latest: Any) -> None:
        manager = trial.run_metadata.checkpoint_manager
        manager._checkpoint_results = [r for r in manager._checkpoint_results if exists(r.checkpoint)]
        left = [c for c in newest_checkpoints(latest.checkpoint) if exists(c)]
        manager._latest_checkpoint_result = (_TrainingResult(checkpoint=left[0], metrics=latest.metrics)
                                             if left else None)
        log.warning("trial %s: its saved checkpoint %s is gone; resuming from %s", trial.trial_id,
                    latest.checkpoint.path, left[0].path if left else "the start")

    return CheckpointRepair()


# ---------------------------------------------------------------- ASHA that survives a resume


def persistent_asha(state_file: Path, **kwargs: Any) -> Any:
    """An ASHAScheduler whose rungs and stop decisions live in ``state_file`` too: written when
    they change, read back when a restored experiment adds its first trial.

    Tune's own saved state lags by a few seconds, so a driver killed just after ASHA stopped a
    trial (and Optuna was told PRUNED) restores that trial as unfinished; the trainable first
    replays its last report, and the scheduler ends it there instead of training it on.
    """
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class PersistentASHA(ASHAScheduler):
        def __init__(self, state_file: str, **kw: Any) -> None:
            super().__init__(**kw)
            self.state_file = state_file
            self._loaded = False
            self._stopped: dict[str, float] = {}  # trial id -> the time_attr value ASHA stopped it at

        def _state(self) -> dict[str, Any]:
            return {"rungs": [[[m, dict(r)] for m, r in b._rungs] for b in self._brackets],
                    "stopped": dict(self._stopped)}

        def _load(self) -> None:
            self._loaded = True
            saved = _read_asha_state(Path(self.state_file))
            if not saved:
                return
            for bracket, rungs in zip(self._brackets, saved["rungs"]):
                by_milestone = {float(m): r for m, r in rungs}
                for milestone, recorded in bracket._rungs:
                    recorded.update(by_milestone.get(float(milestone), {}))
            self._stopped.update(saved.get("stopped", {}))
            log.info("ASHA rungs restored from %s", self.state_file)

        def _save(self, before: dict[str, Any]) -> None:
            after = self._state()
            if after != before:
                tmp = f"{self.state_file}.tmp"
                Path(tmp).write_text(json.dumps(after))
                os.replace(tmp, self.state_file)

        def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
            if not self._loaded:
                self._load()
            super().on_trial_add(tune_controller, trial)

        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            if trial.trial_id in self._stopped:  # stopped before a crash: its replayed report ends it
                return TrialScheduler.STOP
            before = self._state()
            action = super().on_trial_result(tune_controller, trial, result)
            if action == TrialScheduler.STOP and result.get(self._time_attr, self._max_t) < self._max_t:
                self._stopped[trial.trial_id] = result[self._time_attr]
            self._save(before)
            return action

        def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
            before = self._state()
            if trial.trial_id in self._trial_info:
                super().on_trial_complete(tune_controller, trial, result)
            self._save(before)

        def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
            self._trial_info.pop(trial.trial_id, None)

    return PersistentASHA(str(state_file), **kwargs)


def _read_asha_state(state_file: Path) -> dict[str, Any]:
    """``{"rungs": [bracket][rung] = [milestone, {trial_id: signed value}], "stopped": {trial_id:
    epoch}}``; empty when there is no file; a file written before stops were kept holds the rungs only."""
    saved = json.loads(state_file.read_text()) if state_file.exists() else {}
    return saved if isinstance(saved, dict) else {"rungs": saved}


def asha_rungs(state_file: Path) -> list[list[list[Any]]]:
    """The saved rungs, ``[bracket][rung] = [milestone, {trial_id: signed value}]`` (tests, reports)."""
    return _read_asha_state(state_file).get("rungs", [])
