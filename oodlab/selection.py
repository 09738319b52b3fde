"""Model selection on validation metrics, reporting the selected configurations' test metrics.

A study's target (the parent run's ``metric`` param; several comma-separated for a
multi-objective study, with ``mode`` alike) should be a ``val_`` metric: configurations
(trials grouped without their seed) are ranked by the mean target over seeds, the best
one is selected (multi-objective: every configuration on the Pareto front of the mean
targets), and only then are its *test* metrics read, as mean (sd) over the same seeds.
Selecting on a test metric is allowed by the study only with an explicit flag; the
report then says so in its first lines. Pure functions: no MLflow here (see ``report``).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field

import numpy as np

from oodlab.experiment import is_val_metric
from oodlab.metrics import METRICS

IGNORED = {"seed", "device", "eval_every", "eval_batch_size", "vae_cache"}  # params that do not define a configuration
LOWER_IS_BETTER = ("fpr95", "fpr80", "detection_error")  # default mode "min" for these (and val_id_*)
SHOWN = ("auroc", "fpr95")  # test metrics in the markdown table (every one is in the CSV)

Trial = tuple[dict[str, str], dict[str, float]]  # (params, metrics) of one finished trial


@dataclass
class Group:
    """The finished trials of one configuration (all params but the seed)."""

    config: tuple[tuple[str, str], ...]
    metrics: list[dict[str, float]] = field(default_factory=list)

    def values(self, name: str) -> list[float]:
        return [float(m[name]) for m in self.metrics if name in m and math.isfinite(float(m[name]))]

    def mean(self, name: str) -> float:
        v = self.values(name)
        return float(np.mean(v)) if v else math.nan

    def sd(self, name: str) -> float:
        """Sample sd over seeds (NaN with one seed)."""
        v = self.values(name)
        return float(np.std(v, ddof=1)) if len(v) > 1 else math.nan


def default_mode(metric: str) -> str:
    """"min" for error rates and the ID validation mean score (e.g. val_id_bpd), else "max"."""
    base = metric.removeprefix("val_")
    return "min" if base.startswith(("id_", *LOWER_IS_BETTER)) else "max"


def targets_of(params: dict[str, str]) -> tuple[list[str], list[str]]:
    """(targets, modes) from a study's parent-run params ``metric`` and ``mode`` (comma lists)."""
    targets = [t.strip() for t in params.get("metric", "").split(",") if t.strip()]
    if not targets:
        raise ValueError("the study's parent run records no target metric (param 'metric')")
    modes = [m.strip() for m in params.get("mode", "").split(",") if m.strip()] or [default_mode(t) for t in targets]
    if len(modes) == 1 and len(targets) > 1:
        modes = modes * len(targets)
    if len(modes) != len(targets) or any(m not in ("min", "max") for m in modes):
        raise ValueError(f"modes {modes} do not fit targets {targets}")
    return targets, modes


def group(trials: list[Trial]) -> list[Group]:
    """Trials grouped by configuration: every param except the seed (and run-only settings)."""
    keys = sorted({k for p, _ in trials for k in p} - IGNORED)
    groups: dict[tuple, Group] = {}
    for params, metrics in trials:
        cfg = tuple((k, params.get(k, "")) for k in keys)
        groups.setdefault(cfg, Group(cfg)).metrics.append(metrics)
    return list(groups.values())


def _dominates(a: list[float], b: list[float]) -> bool:
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def select(groups: list[Group], targets: list[str], modes: list[str]) -> list[Group]:
    """The best configuration by mean target (ties: all of them), or the Pareto front of the mean
    targets for several targets; configurations without a finite value of every target are skipped."""
    sign = [1.0 if m == "max" else -1.0 for m in modes]
    scored = [(g, [s * g.mean(t) for s, t in zip(sign, targets)]) for g in groups]
    scored = [(g, v) for g, v in scored if all(math.isfinite(x) for x in v)]
    if not scored:
        return []
    if len(targets) == 1:
        best = max(v[0] for _, v in scored)
        return [g for g, v in scored if v[0] == best]
    return [g for g, v in scored if not any(_dominates(w, v) for _, w in scored)]


def varied(groups: list[Group]) -> list[str]:
    """Params that differ between configurations (what names a configuration in a table)."""
    keys = {k for g in groups for k, _ in g.config}
    return sorted(k for k in keys if len({dict(g.config).get(k) for g in groups}) > 1)


def test_metrics(g: Group, shown: tuple[str, ...] | None = None) -> list[str]:
    """Names of the test metrics the group's trials report (``{metric}_{set}_{score}``, no ``val_``)."""
    names = sorted({k for m in g.metrics for k in m})
    wanted = shown or METRICS
    return [k for k in names if not is_val_metric(k) and any(k.startswith(m + "_") for m in wanted)]


def _fmt(mean: float, sd: float) -> str:
    return f"{mean:.3f} ({sd:.3f})" if math.isfinite(sd) else f"{mean:.3f} (–)"


def to_markdown(study: str, groups: list[Group], chosen: list[Group], targets: list[str], modes: list[str],
                allowed: bool = False) -> str:
    """Which target selected which configuration(s), then their test metrics, mean (sd) over seeds;
    ``allowed``: the study recorded its explicit permission for a test target."""
    leak = [t for t in targets if not is_val_metric(t)]
    target_text = ", ".join(f"`{t}` ({m})" for t, m in zip(targets, modes))
    lines = [f"# {study}: selected by {'the Pareto front of ' if len(targets) > 1 else ''}{target_text}", ""]
    if leak:
        how = "allowed by the study's explicit --allow-test-target" if allowed else "no permission recorded"
        lines += [f"**Warning: selected on TEST metric(s) {', '.join(leak)}** ({how}): the test numbers below "
                  "are biased upwards; a validation target (`val_…`) avoids this.", ""]
    else:
        lines += ["Configurations were ranked by the validation target's mean over seeds (ID validation images held "
                  "out of training vs validation OOD sets); the test metrics below were not used for the choice.", ""]
    if not chosen:
        return "\n".join([*lines, "(no configuration has a finite value of every target)", ""])
    keys = varied(groups) or [k for k, _ in chosen[0].config][:3]
    lines += [f"{len(groups)} configuration(s); selected {len(chosen)}.", "",
              "| " + " | ".join([*keys, "seeds", *targets]) + " |", "|" + "---|" * (len(keys) + 1 + len(targets))]
    for g in chosen:
        c = dict(g.config)
        lines.append("| " + " | ".join([*(c.get(k, "") for k in keys), str(len(g.metrics)),
                                        *(_fmt(g.mean(t), g.sd(t)) for t in targets)]) + " |")
    lines.append("")
    for g in chosen:
        c = dict(g.config)
        name = ", ".join(f"{k}={c.get(k, '')}" for k in keys)
        lines += [f"## Test metrics of {name or 'the selected configuration'}, mean (sd) over {len(g.metrics)} seed(s)",
                  "", "| test metric | mean (sd) |", "|---|---|"]
        lines += [f"| `{k}` | {_fmt(g.mean(k), g.sd(k))} |" for k in test_metrics(g, SHOWN)]
        lines.append("")
    return "\n".join(lines)


def to_csv(groups: list[Group], chosen: list[Group], targets: list[str]) -> str:
    """Long format, every configuration: params, selected (0/1), metric, split, n, mean, sd."""
    keys = varied(groups)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*keys, "selected", "metric", "split", "n", "mean", "sd"])
    for g in groups:
        c = dict(g.config)
        for k in dict.fromkeys([*targets, *test_metrics(g)]):
            sd = g.sd(k)
            w.writerow([*(c.get(x, "") for x in keys), int(any(g is s for s in chosen)), k,
                        "val" if is_val_metric(k) else "test", len(g.values(k)), f"{g.mean(k):.6f}",
                        "" if math.isnan(sd) else f"{sd:.6f}"])
    return buf.getvalue()
