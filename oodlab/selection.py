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
from dataclasses import dataclass

from oodlab.metrics import METRICS
from oodlab.naming import SD, VAL, is_val_metric, mode_of
from oodlab.trials import Configuration

SHOWN = ("auroc", "fpr95")  # test metrics in the markdown table (every one is in the CSV)
WEAK_TAU = 0.3  # Kendall τ below this: the validation target ranks configurations unlike the test does

def targets_of(params: dict[str, str]) -> tuple[list[str], list[str]]:
    """(targets, modes) from a study's parent-run params ``metric`` and ``mode`` (comma lists)."""
    targets = [t.strip() for t in params.get("metric", "").split(",") if t.strip()]
    if not targets:
        raise ValueError("the study's parent run records no target metric (param 'metric')")
    modes = [m.strip() for m in params.get("mode", "").split(",") if m.strip()] or [mode_of(t) for t in targets]
    if len(modes) == 1 and len(targets) > 1:
        modes = modes * len(targets)
    if len(modes) != len(targets) or any(m not in ("min", "max") for m in modes):
        raise ValueError(f"modes {modes} do not fit targets {targets}")
    return targets, modes


def _dominates(a: list[float], b: list[float]) -> bool:
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def select(groups: list[Configuration], targets: list[str], modes: list[str]) -> list[Configuration]:
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


def varied(groups: list[Configuration]) -> list[str]:
    """Params that differ between configurations (what names a configuration in a table)."""
    keys = {k for g in groups for k, _ in g.config}
    return sorted(k for k in keys if len({dict(g.config).get(k) for g in groups}) > 1)


def test_metrics(g: Configuration, shown: tuple[str, ...] | None = None) -> list[str]:
    """Names of the test metrics the group's trials report (``{metric}_{set}_{score}``, no ``val_``)."""
    names = sorted({k for m in g.metrics for k in m})
    wanted = shown or METRICS
    return [k for k in names if not is_val_metric(k) and any(k.startswith(m + "_") for m in wanted)]


def value_text(v: str) -> str:
    """A param as a table shows it: numbers to 4 significant digits (searched floats print 17)."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    short = f"{x:.4g}"
    return str(v) if float(short) == x else short  # "2.0" stays, 0.00011423254155608379 -> 0.0001142


def _fmt(mean: float, sd: float) -> str:
    return f"{mean:.3f} ({sd:.3f})" if math.isfinite(sd) else f"{mean:.3f} (–)"


def to_markdown(study: str, groups: list[Configuration], chosen: list[Configuration], targets: list[str],
                modes: list[str], allowed: bool = False) -> str:
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
        lines.append("| " + " | ".join([*(value_text(c.get(k, "")) for k in keys), str(len(g.metrics)),
                                        *(_fmt(g.mean(t), g.sd(t)) for t in targets)]) + " |")
    lines.append("")
    for g in chosen:
        c = dict(g.config)
        name = ", ".join(f"{k}={value_text(c.get(k, ''))}" for k in keys)
        lines += [f"## Test metrics of {name or 'the selected configuration'}, mean (sd) over {len(g.metrics)} seed(s)",
                  "", "| test metric | mean (sd) |", "|---|---|"]
        lines += [f"| `{k}` | {_fmt(g.mean(k), g.sd(k))} |" for k in test_metrics(g, SHOWN)]
        lines.append("")
    return "\n".join(lines)


def to_csv(groups: list[Configuration], chosen: list[Configuration], targets: list[str]) -> str:
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


@dataclass(frozen=True)
class Agreement:
    """How the validation target ranks the finished configurations against a test metric of the same
    score: Kendall τ of (direction-adjusted) means, +1 = the same order, 0 = unrelated, −1 = reversed."""

    target: str
    test_metric: str
    tau: float
    n: int

    @property
    def weak(self) -> bool:
        return not self.tau >= WEAK_TAU  # NaN (too few configurations, ties only) counts as weak


def _same_score_tests(table: dict[str, float], target: str) -> list[str]:
    """The test metrics of the target's metric and score, one per test set: for
    ``val_auroc_constant_bpd``, ``auroc_mnist_bpd``, ``auroc_notmnist_bpd``… (scores are read off the
    ``val_id_{score}`` names, since set names and scores may both hold underscores)."""
    base = target.removeprefix(VAL)
    metric = max((m for m in METRICS if base.startswith(m + "_")), key=len, default=None)
    scores = sorted((k[len(VAL + "id_"):] for k in table if k.startswith(VAL + "id_") and not k.endswith(SD)),
                    key=len, reverse=True)
    score = next((s for s in scores if base.endswith("_" + s)), None)
    if not is_val_metric(target) or metric is None or score is None:
        return []
    longer = [m for m in METRICS if m != metric and m.startswith(metric)]  # fpr95 vs fpr95_oodpos
    return sorted(k for k in table if k.startswith(metric + "_") and k.endswith("_" + score) and not k.endswith(SD)
                  and not is_val_metric(k) and not any(k.startswith(m + "_") for m in longer))


def agreement(groups: list[Configuration], target: str) -> list[Agreement]:
    """τ between ``target`` (a ``val_{metric}_{set}_{score}``) and the same metric and score on each
    test set, over the configurations with finite means of both; [] when the target is no such metric."""
    tables = [m for g in groups for m in g.metrics]
    if not tables:
        return []
    out = []
    for test in _same_score_tests(tables[0], target):
        pairs = [(g.mean(target), g.mean(test)) for g in groups]
        pairs = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
        tau = math.nan
        if len(pairs) >= 3:
            from scipy import stats  # here: `oodlab report` on one configuration skips scipy's import

            a, b = zip(*pairs)
            tau = float(stats.kendalltau(a, b).statistic)  # one metric on both sides: one direction
        out.append(Agreement(target, test, tau, len(pairs)))
    return out


def agreement_markdown(agreements: list[Agreement]) -> str:
    """The rank agreement lines of a report, with a one-line warning for each weak or negative τ."""
    if not agreements:
        return ""
    lines = ["", "Does validation choose like the test? Kendall τ between the target and the test metric over the "
             "finished configurations (+1 same order, −1 reversed):", ""]
    for a in agreements:
        lines.append(f"- `{a.test_metric}`: τ = {a.tau:.2f} over {a.n} configurations" if math.isfinite(a.tau)
                     else f"- `{a.test_metric}`: τ undefined ({a.n} configurations; needs 3 with distinct values)")
    for a in agreements:
        if a.weak and math.isfinite(a.tau):
            how = "against" if a.tau < 0 else "only weakly like"
            lines.append(f"**Warning: `{a.target}` ranks configurations {how} `{a.test_metric}` "
                         f"(τ = {a.tau:.2f}); choose a validation set that ranks like the test.**")
    return "\n".join([*lines, ""])
