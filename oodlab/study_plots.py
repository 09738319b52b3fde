"""Pictures of a search, for the study's parent run: optimisation history, parameter
importances, the target against each searched parameter (mean and spread over seeds, the
paper's value marked) and, for several targets, the Pareto front. Each figure that cannot
be drawn (too few trials, nothing varies) is skipped with a log line, never an error."""

from __future__ import annotations

import logging
import math
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

from oodlab.naming import NOT_HYPERPARAMETERS
from oodlab.plots import pyplot

log = logging.getLogger(__name__)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot().close(fig)
    return path


def _optuna_figure(draw: Any, path: Path) -> Path | None:
    """An ``optuna.visualization.matplotlib`` plot saved as PNG (None when it cannot be drawn)."""
    plt = pyplot()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the matplotlib backend is marked experimental
            ax = draw()
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
        log.debug("skipped %s: %s", path.name, e)
        plt.close("all")
        return None
    fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    fig.set_size_inches(7, 4.5)
    return _save(fig, path)


def target_vs_params(rows: list[dict[str, Any]], keys: list[str], target: str, path: Path,
                     paper: dict[str, Any] | None = None, log_keys: frozenset[str] = frozenset()) -> Path | None:
    """One panel per searched parameter: every finished trial (dots), and the mean ± sd over
    seeds of each configuration (error bars); the paper's value as a dashed line."""
    done = [r for r in rows if isinstance(r.get(target), float) and math.isfinite(r[target])]
    keys = [k for k in keys if k not in NOT_HYPERPARAMETERS and len({str(r.get(k)) for r in done}) > 1]
    if not done or not keys:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        numeric = all(isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) for r in done)
        groups: dict[tuple, list[float]] = defaultdict(list)  # configuration -> one value per trial
        for r in done:
            groups[tuple((k, str(r.get(k))) for k in keys)].append(r[target])
        labels = sorted({str(r.get(key)) for r in done}, key=lambda s: float(s) if numeric else s)
        def pos(v: Any, labels: list[str] = labels, numeric: bool = numeric) -> float:
            return float(v) if numeric else float(labels.index(str(v)))

        stopped = [r for r in done if str(r.get("status", "OK")) != "OK"]
        full = [r for r in done if str(r.get("status", "OK")) == "OK"]
        ax.scatter([pos(r[key]) for r in full], [r[target] for r in full], s=14, alpha=0.6, label="trial")
        if stopped:
            ax.scatter([pos(r[key]) for r in stopped], [r[target] for r in stopped], s=14, alpha=0.6, marker="x",
                       color="gray", label="stopped early (value at stop)")
        for cfg, vals in groups.items():
            x = pos(dict(cfg)[key])
            if len(vals) > 1:
                m = sum(vals) / len(vals)
                sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
                ax.errorbar([x], [m], yerr=[sd], fmt="o", color="C1", capsize=3)
        if paper and key in paper:
            ref = paper[key]
            ax.axvline(float(ref) if numeric else labels.index(str(ref)) if str(ref) in labels else -1,
                       ls="--", color="k", lw=1, label=f"paper: {ref}")
        if not numeric:
            ax.set_xticks(range(len(labels)), labels, rotation=30)
        elif key in log_keys:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(target)
        ax.legend(fontsize=7)
    fig.suptitle(f"{target} per searched parameter (orange: mean ± sd over seeds)", fontsize=9)
    return _save(fig, path)


def search_figures(study: Any, rows: list[dict[str, Any]], plan: Any, folder: Path) -> list[Path]:
    """Every figure that can be drawn for this search, as PNGs in ``folder``."""
    import optuna
    from optuna.visualization import matplotlib as ovm

    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    keys = list(plan.space)
    varying = [k for k in keys if len({str(t.params.get(k)) for t in finished}) > 1]
    out: list[Path | None] = []
    if plan.multi:
        names = list(plan.targets)
        if len(names) in (2, 3):
            out.append(_optuna_figure(lambda: ovm.plot_pareto_front(study, target_names=names),
                                      folder / "pareto_front.png"))
        def first(t: Any) -> float:
            return float(t.values[0])

        out.append(_optuna_figure(lambda: ovm.plot_optimization_history(study, target=first, target_name=names[0]),
                                  folder / "optimization_history.png"))
    else:
        out.append(_optuna_figure(lambda: ovm.plot_optimization_history(study, target_name=plan.metric),
                                  folder / "optimization_history.png"))
        if len(finished) >= 3 and varying:
            out.append(_optuna_figure(lambda: ovm.plot_param_importances(study, params=varying),
                                      folder / "param_importances.png"))
    log_keys = frozenset(k for k, d in plan.space.items() if getattr(d, "log", False))
    out.append(target_vs_params(rows, keys, plan.metric, folder / "target_vs_params.png",
                                paper=getattr(plan, "paper_point", None), log_keys=log_keys))
    return [p for p in out if p is not None]
