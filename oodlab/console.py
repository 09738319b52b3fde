"""What a study prints: one line per trial event while it runs, one table at the end.

Tune's own progress tables and Optuna's study messages are off unless ``-v``; the lines
here go through ``logging`` (the study entry point sends logger ``oodlab`` to stdout).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from ray import tune

log = logging.getLogger("oodlab.console")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.4f}"
    return "-" if v is None else str(v)


def params_text(config: dict[str, Any], keys: tuple[str, ...], sep: str = " ") -> str:
    """``k=v`` per searched parameter; "the fixed configuration" when nothing is searched."""
    return sep.join(f"{k}={_fmt(config.get(k))}" for k in keys) or "the fixed configuration"


class ConsoleCallback(tune.Callback):
    """One line when a trial starts, finishes, is stopped early or fails."""

    def __init__(self, keys: tuple[str, ...], targets: tuple[str, ...], max_epoch: int, total: int) -> None:
        self.keys, self.targets, self.max_epoch, self.total = keys, targets, max_epoch, total
        self._t0: dict[str, float] = {}
        self._ended = 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_t0": {}, "_ended": 0}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._t0[trial.trial_id] = time.time()
        log.info("trial %s started: %s", trial.trial_id, params_text(trial.config, self.keys))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended += 1
        r = trial.last_result or {}
        took = time.time() - self._t0.get(trial.trial_id, time.time())
        values = ", ".join(f"{t}={_fmt(r.get(t))}" for t in self.targets)
        if r.get("error"):
            what = f"failed at epoch {r.get('epoch')}: {str(r['error'])[:200]}"
        elif r.get("epoch", self.max_epoch) < self.max_epoch:
            what = f"stopped early at epoch {r.get('epoch')} (ASHA): {values}"
        else:
            what = f"done, epoch {r.get('epoch')}: {values}"
        log.info("trial %s %s [%d/%d, %.0f s]", trial.trial_id, what, self._ended, self.total, took)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended += 1
        err = trial.get_error()
        last = str(err).strip().splitlines()[-1][:200] if err else "?"
        log.info("trial %s errored: %s [%d/%d]", trial.trial_id, last, self._ended, self.total)


def format_table(rows: list[dict[str, Any]], header: str = "") -> str:
    """Markdown table of ``rows`` (dicts with the same keys)."""
    if not rows:
        return "(no trials)"
    cols = list(rows[0])
    lines = ([header, ""] if header else []) + ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
