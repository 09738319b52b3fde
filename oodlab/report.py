"""A study's results over seeds, in paper 000's table format, beside the paper's numbers.

``report(storage, study)`` reads the finished trials of a study from the MLflow store at
``<storage>/mlflow.db`` (child runs tagged ``oodlab.role=trial``: params = the trial's
config, metrics = its flat table), groups them by config without the seed, and writes
the mean (sd) of every AUROC as markdown (rows: inlier, OOD, noise model and any other
varied setting; columns: source of negatives), as CSV, and as a bar plot. The three
files are logged to the study's parent run (tag ``oodlab.role=parent``); the markdown
is returned. Paper 000's numbers (Tables I–III) stand beside ours where it has the row.

Before that table comes the selection (``oodlab.selection``): the configuration(s) chosen
by the study's target (the parent run's ``metric``/``mode`` params; a ``val_`` metric
unless the study allowed a test target) and their test metrics, mean (sd) over seeds;
also logged as ``selection.md`` / ``selection.csv``.
"""

from __future__ import annotations

import csv
import io
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from oodlab import naming, selection, stores, tags, trials
from oodlab.naming import SD, set_key

# Paper 000 (Csiszárik et al.), mean (sd) over 10 runs: (inlier, OOD, noise model, negatives, score).
# Tables I (gray) and II (color): columns baseline ("none"), auxiliary ("aux"), adversarial.
_T1 = {  # (inlier, OOD): {score: {decoder: (none, aux, adversarial)}}
    ("fashion_mnist", "mnist"): {"bpd": {"bernoulli": ((.46, .05), (1.00, .00), (.70, .13)),
                                         "gaussian": ((.98, .00), (1.00, .00), (.80, .04))},
                                 "kl": {"bernoulli": ((.61, .09), (1.00, .00), (.88, .07)),
                                        "gaussian": ((.26, .03), (1.00, .00), (.74, .05))}},
    ("fashion_mnist", "emnist_letters"): {"bpd": {"bernoulli": ((.61, .01), (.99, .00), (.78, .07)),
                                                  "gaussian": ((.97, .00), (1.00, .00), (.85, .04))},
                                          "kl": {"bernoulli": ((.68, .07), (1.00, .00), (.84, .04)),
                                                 "gaussian": ((.38, .04), (.99, .00), (.79, .05))}},
    ("mnist", "fashion_mnist"): {"bpd": {"bernoulli": ((1.00, .00), (1.00, .00), (1.00, .00)),
                                         "gaussian": ((.97, .00), (1.00, .00), (.98, .01))},
                                 "kl": {"bernoulli": ((.73, .14), (1.00, .00), (.94, .10)),
                                        "gaussian": ((.71, .04), (1.00, .00), (.98, .01))}},
    ("mnist", "emnist_letters"): {"bpd": {"bernoulli": ((.99, .00), (.99, .00), (.98, .00)),
                                          "gaussian": ((.78, .14), (.93, .08), (.79, .04))},
                                  "kl": {"bernoulli": ((.64, .03), (.76, .03), (.89, .02)),
                                         "gaussian": ((.54, .07), (.75, .08), (.74, .04))}},
    ("emnist_letters", "fashion_mnist"): {"bpd": {"bernoulli": ((.98, .00), (.98, .00), (.99, .00)),
                                                  "gaussian": ((.80, .07), (.76, .08), (.93, .04))},
                                          "kl": {"bernoulli": ((.66, .14), (.54, .09), (.98, .00)),
                                                 "gaussian": ((.54, .10), (.49, .23), (.91, .05))}},
    ("emnist_letters", "mnist"): {"bpd": {"bernoulli": ((.58, .02), (.58, .02), (.73, .07)),
                                          "gaussian": ((.67, .17), (.58, .20), (.65, .04))},
                                  "kl": {"bernoulli": ((.37, .05), (.45, .03), (.75, .06)),
                                         "gaussian": ((.36, .08), (.43, .10), (.64, .04))}},
    ("cifar10", "svhn"): {"bpd": {"bernoulli": ((.59, .00), (.90, .05), (.81, .04)),
                                  "gaussian": ((.25, .02), (.93, .01), (.84, .03))},
                          "kl": {"bernoulli": ((.29, .00), (.90, .06), (.81, .04)),
                                 "gaussian": ((.25, .01), (.93, .01), (.84, .03))}},
    ("svhn", "cifar10"): {"bpd": {"bernoulli": ((.51, .00), (1.00, .00), (.70, .03)),
                                  "gaussian": ((.92, .00), (1.00, .00), (.75, .11))},
                          "kl": {"bernoulli": ((.87, .00), (1.00, .00), (.70, .03)),
                                 "gaussian": ((.74, .01), (1.00, .00), (.74, .11))}},
}
PAPER_000: dict[tuple[str, str, str, str, str], tuple[float, float]] = {
    (i, o, dec, neg, score): v
    for (i, o), by_score in _T1.items() for score, by_dec in by_score.items() for dec, vals in by_dec.items()
    for neg, v in zip(("none", "aux", "adversarial"), vals)
}
# Table III: Fashion-MNIST -> MNIST, Bernoulli, other sources ("random": uniform pixels; inlier + N(0, 0.25²)).
PAPER_000.update({
    ("fashion_mnist", "mnist", "bernoulli", "random", "bpd"): (.47, .05),
    ("fashion_mnist", "mnist", "bernoulli", "random", "kl"): (.56, .08),
    ("fashion_mnist", "mnist", "bernoulli", "inlier_noise", "bpd"): (.44, .01),
    ("fashion_mnist", "mnist", "bernoulli", "inlier_noise", "kl"): (.70, .09),
})
# The paper's auxiliary set per (inlier, OOD): the third gray set; downscaled ImageNet for color.
PAPER_AUX = {("fashion_mnist", "mnist"): "emnist_letters", ("fashion_mnist", "emnist_letters"): "mnist",
             ("mnist", "fashion_mnist"): "emnist_letters", ("mnist", "emnist_letters"): "fashion_mnist",
             ("emnist_letters", "fashion_mnist"): "mnist", ("emnist_letters", "mnist"): "fashion_mnist",
             ("cifar10", "svhn"): "imagenet32", ("svhn", "cifar10"): "imagenet32"}
SCORE_TITLES = {"bpd": "AUC BPD", "kl": "AUC KL", "iwae": "AUC IWAE-BPD"}
NEGATIVE_ORDER = ("none", "aux", "gaussian_noise", "uniform_noise", "random", "inlier_noise", "adversarial")


def paper_reference(id_spec: str, ood_spec: str) -> dict[str, float]:
    """Paper 000's means for one (inlier, OOD) pair as ``{"decoder/negatives/score": mean}`` (StudySpec.paper)."""
    return {f"{dec}/{neg}/{score}": v[0] for (i, o, dec, neg, score), v in PAPER_000.items()
            if (i, o) == (id_spec, ood_spec)}


@dataclass
class Cell:
    """AUROCs of one configuration × OOD set × score, one value per seed."""

    row: tuple[tuple[str, str], ...]  # (name, value) pairs naming the table row
    negatives: str
    score: str
    values: list[float] = field(default_factory=list)
    paper: tuple[float, float] | None = None

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def sd(self) -> float:
        """Sample standard deviation over seeds (NaN with one seed)."""
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else math.nan


# ---------------------------------------------------------------- reading MLflow

def _client(storage: Path, mlflow_uri: str | None = None) -> Any:
    from mlflow.tracking import MlflowClient

    if mlflow_uri:  # a database or tracking server (--mlflow-uri)
        return MlflowClient(tracking_uri=mlflow_uri)
    db = Path(storage) / "mlflow.db"
    if not db.is_file():
        raise FileNotFoundError(f"no MLflow store at {db}; run a study with --storage {storage} first")
    return MlflowClient(tracking_uri=stores.default_mlflow_uri(Path(storage)))


def aggregate(configurations: list[trials.Configuration]) -> list[Cell]:
    """One Cell per (configuration, OOD set, score) of every test AUROC, its replicates' values."""
    varied = [k for k in selection.varied(configurations) if k not in ("negatives", "decoder")]
    cells: dict[tuple, Cell] = {}
    for g in configurations:
        params = g.params
        id_spec, neg, dec = params.get("id", "?"), params.get("negatives", "-"), params.get("decoder", "-")
        rest = tuple((k, selection.value_text(params.get(k, ""))) for k in varied)
        for ood in naming.split_specs(params.get("ood", "")):
            row = (("inlier", id_spec), ("OOD", ood), ("noise model", dec), *rest)
            prefix = f"auroc_{set_key(ood)}_"
            names = sorted({n for m in g.metrics for n in m if n.startswith(prefix) and not n.endswith(SD)})
            for name in names:
                score = name[len(prefix):]
                cell = cells.setdefault((row, neg, score), Cell(row, neg, score,
                                                                paper=PAPER_000.get((id_spec, ood, dec, neg, score))))
                cell.values.extend(g.values(name))
    return list(cells.values())


def _fmt(mean: float, sd: float) -> str:
    return f"{mean:.2f} ({sd:.2f})" if math.isfinite(sd) else f"{mean:.2f} (–)"


def _negatives(cells: list[Cell]) -> list[str]:
    present = {c.negatives for c in cells}
    return [n for n in NEGATIVE_ORDER if n in present] + sorted(present - set(NEGATIVE_ORDER))


def to_markdown(cells: list[Cell], study: str = "") -> str:
    """One table per score, rows = configs, columns = negatives; cell: ours mean (sd) [paper mean (sd)]."""
    if not cells:
        return f"# {study}\n\n(no finished trials)\n"
    seeds = sorted({len(c.values) for c in cells})
    lines = [f"# {study}: test AUROC of every configuration, mean (sd) over {'/'.join(map(str, seeds))} seed(s)", "",
             "Each cell: ours mean (sd) [paper 000 mean (sd), 10 runs, where the paper has the row]. "
             "sd is the sample sd over seeds (– with one seed). Every configuration is shown, for reading; "
             "choosing the best cell here would select on the test set (the selection above does not).", ""]
    negs = _negatives(cells)
    for score in sorted({c.score for c in cells}, key=lambda s: (s not in SCORE_TITLES, s)):
        sub = [c for c in cells if c.score == score]
        rows = sorted({c.row for c in sub})
        by = {(c.row, c.negatives): c for c in sub}
        head = [k for k, _ in rows[0]]
        lines += [f"## {SCORE_TITLES.get(score, 'AUC ' + score)}", "",
                  "| " + " | ".join(head + negs) + " |", "|" + "---|" * (len(head) + len(negs))]
        for row in rows:
            out = [str(v) for _, v in row]
            for n in negs:
                c = by.get((row, n))
                if c is None:
                    out.append("")
                    continue
                s = _fmt(c.mean, c.sd) + (f" n={len(c.values)}" if len(seeds) > 1 else "")
                out.append(s + (f" [{_fmt(*c.paper)}]" if c.paper else ""))
            lines.append("| " + " | ".join(out) + " |")
        lines.append("")
    pairs = {(dict(c.row)["inlier"], dict(c.row)["OOD"]) for c in cells if c.negatives == "aux" and c.paper}
    notes = sorted(f"{i} → {o}: {PAPER_AUX[(i, o)]}" for i, o in pairs if (i, o) in PAPER_AUX)
    if notes:
        lines += ["Paper's auxiliary set (ours is the trials' `aux` param): " + "; ".join(notes) + ".", ""]
    return "\n".join(lines)


def to_csv(cells: list[Cell]) -> str:
    """Long format: row params, negatives, score, n, mean, sd, paper_mean, paper_sd."""
    head = sorted({k for c in cells for k, _ in c.row}, key=lambda k: [k for c in cells for k, _ in c.row].index(k))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*head, "negatives", "score", "n", "mean", "sd", "paper_mean", "paper_sd"])
    for c in sorted(cells, key=lambda c: (c.score, c.row, c.negatives)):
        r = dict(c.row)
        pm, ps = c.paper if c.paper else ("", "")
        w.writerow([*(r.get(k, "") for k in head), c.negatives, c.score, len(c.values), f"{c.mean:.6f}",
                    "" if math.isnan(c.sd) else f"{c.sd:.6f}", pm, ps])
    return buf.getvalue()


def bar_plot(cells: list[Cell], path: Path) -> None:
    """One panel per score: bars = mean AUROC (error bar = sd) per row and source; black ticks = paper."""
    from oodlab.plots import pyplot

    plt = pyplot()
    scores = sorted({c.score for c in cells}, key=lambda s: (s not in SCORE_TITLES, s))
    negs = _negatives(cells)
    width_in = max(6, 1.6 * len({c.row for c in cells}) * len(negs) / 2)
    fig, axes = plt.subplots(len(scores), 1, figsize=(width_in, 3.2 * len(scores)),
                             squeeze=False)
    width = 0.8 / max(len(negs), 1)
    for ax, score in zip(axes[:, 0], scores):
        sub = [c for c in cells if c.score == score]
        rows = sorted({c.row for c in sub})
        by = {(c.row, c.negatives): c for c in sub}
        for j, n in enumerate(negs):
            xs = [i + (j - (len(negs) - 1) / 2) * width for i in range(len(rows))]
            cs = [by.get((r, n)) for r in rows]
            ax.bar(xs, [c.mean if c else 0 for c in cs], width,
                   yerr=[0 if (c is None or math.isnan(c.sd)) else c.sd for c in cs],
                   label=n, capsize=2)
            px = [(x, c.paper[0]) for x, c in zip(xs, cs) if c and c.paper]
            if px:
                ax.scatter(*zip(*px), marker="_", s=200, c="k", zorder=3, label="paper" if j == 0 else None)
        ax.axhline(0.5, color="gray", lw=0.8, ls=":")
        ax.set_xticks(range(len(rows)), ["\n".join(f"{v}" for _, v in r) for r in rows], fontsize=7)
        ax.set(ylim=(0, 1.05), ylabel=SCORE_TITLES.get(score, score))
        ax.legend(fontsize=7, ncol=len(negs) + 1, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def selection_report(study_runs: trials.StudyRuns) -> tuple[str, str, dict[str, float]]:
    """(markdown, csv, τ per test metric) of the configurations the study's target selects, among trials
    that ran to the end (not stopped early), their test metrics, and how the target ranks like the test."""
    runs, study = study_runs.completed(), study_runs.study
    if runs.parent is None:
        return f"# {study}: no parent run, so no recorded target; nothing selected\n", "", {}
    params = dict(runs.parent.data.params)
    try:
        targets, modes = selection.targets_of(params)
    except ValueError as e:
        return f"# {study}: nothing selected ({e})\n", "", {}
    groups = runs.configurations()
    chosen = selection.select(groups, targets, modes)
    allowed = runs.parent.data.tags.get(tags.ALLOW_TEST_TARGET) == "true"
    agreements = selection.agreement(groups, targets[0])
    md = selection.to_markdown(study, groups, chosen, targets, modes, allowed)
    taus = {f"tau_{a.test_metric}": a.tau for a in agreements if math.isfinite(a.tau)}
    return md + selection.agreement_markdown(agreements), selection.to_csv(groups, chosen, targets), taus


def report(storage: Path, study: str, mlflow_uri: str | None = None) -> str:
    """The selection by the study's target, then the paper-format AUROC table of every configuration;
    both logged to the study's parent run, except in an export (``oodlab export``: a snapshot, e.g.
    the repository's results/, which reading must not change); returns the markdown."""
    client = _client(Path(storage), mlflow_uri)
    runs = trials.read(client, study)
    exported = runs.parent is not None and tags.EXPORTED_FROM in runs.parent.data.tags
    parent = None if exported else runs.parent_id
    sel_md, sel_csv, taus = selection_report(runs)
    cells = aggregate(runs.configurations())
    md = to_markdown(cells, study)
    if parent is not None and taus:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        client.log_batch(parent, metrics=[Metric(k, v, now, 0) for k, v in taus.items()])
    if parent is not None and runs.replicates:
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "selection.md").write_text(sel_md)
            (Path(d) / "selection.csv").write_text(sel_csv)
            client.log_artifact(parent, str(Path(d) / "selection.md"))
            client.log_artifact(parent, str(Path(d) / "selection.csv"))
    if parent is not None and cells:
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "report.md").write_text(md)
            (Path(d) / "report.csv").write_text(to_csv(cells))
            bar_plot(cells, Path(d) / "report.png")
            for name in ("report.md", "report.csv", "report.png"):
                client.log_artifact(parent, str(Path(d) / name))
    return sel_md + "\n" + md
