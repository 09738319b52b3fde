"""Mean (sd) over seeds of chosen metrics of finished study trials, beside the paper's figures.

``oodlab report`` formats paper 000's tables; this is its generic sibling for the other papers:
it reads the finished replicates (``oodlab.trials``) of one or more studies from the MLflow
store, pools them by study, and writes one markdown row per study with
``mean (sd) [paper]`` per metric. Nothing is typed in by hand: every number comes from a run.

    python -m oodlab.seed_table --storage results/cvae_oodgen --studies t1-authors,t1-text \\
        --metrics auroc_mnist_n1_prob,fpr95_mnist_n1_prob --paper auroc_mnist_n1_prob=0.995
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oodlab import stores, trials


@dataclass(frozen=True)
class Row:
    study: str
    values: dict[str, list[float]]  # metric -> one value per finished trial (seed)


def load_rows(storage: Path, studies: list[str], metrics: list[str]) -> list[Row]:
    """Every finished replicate's metrics per study from ``<storage>/mlflow.db`` (``oodlab.trials``:
    nested seed runs of trials of several seeds, else the trial runs); unknown studies raise ValueError."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(stores.default_mlflow_uri(Path(storage)))
    rows = []
    for name in studies:
        reps = trials.read(client, name).replicates
        rows.append(Row(name, {m: [t[m] for _, t in reps if m in t] for m in metrics}))
    return rows


def cell(values: list[float], paper: float | None, percent: bool) -> str:
    """``mean (sd) [paper]``; sd over seeds (ddof 1), '—' for one seed; n shown when seeds differ by metric."""
    if not values:
        return "—"
    scale = 100.0 if percent else 1.0
    mean = scale * float(np.mean(values))
    sd = scale * float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    fmt = "{:.1f}" if percent else "{:.3f}"
    text = fmt.format(mean) + (f" ({fmt.format(sd)})" if not math.isnan(sd) else "")
    return text + (f" [{fmt.format(scale * paper)}]" if paper is not None else "")


def to_markdown(rows: list[Row], metrics: list[str], paper: dict[str, float], percent: bool = False) -> str:
    head = ["study", "seeds", *metrics]
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        n = max((len(v) for v in r.values.values()), default=0)
        out.append("| " + " | ".join([r.study, str(n), *(cell(r.values[m], paper.get(m), percent) for m in metrics)])
                   + " |")
    return "\n".join(out)


def _paper(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            raise ValueError(f"--paper {item!r}: expected METRIC=NUMBER") from None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m oodlab.seed_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--storage", required=True, help="results root holding mlflow.db")
    p.add_argument("--studies", required=True, help="study names, comma-separated (one row each)")
    p.add_argument("--metrics", required=True, help="flat metric names, comma-separated (one column each)")
    p.add_argument("--paper", action="append", default=[], help="METRIC=VALUE: the paper's figure, a fraction")
    p.add_argument("--percent", action="store_true", help="print ×100 (papers 002's tables are in %%)")
    a = p.parse_args(argv)
    metrics = [m.strip() for m in a.metrics.split(",") if m.strip()]
    try:
        if not (Path(a.storage) / "mlflow.db").is_file():
            raise ValueError(f"no mlflow.db under {a.storage}")
        paper = _paper(a.paper)
        rows = load_rows(Path(a.storage), [s.strip() for s in a.studies.split(",") if s.strip()], metrics)
    except ValueError as e:
        print(f"seed_table: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(to_markdown(rows, metrics, paper, a.percent) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
