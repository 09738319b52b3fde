"""The papers' headline tables, generated from the studies shipped in ``results/``.

Each ``PaperTable`` names an exported study folder (``results/<folder>``, made by ``oodlab
export``), the studies in it, which hyperparameters make its rows, the metrics (columns) and the
paper's figure for each cell. ``python -m oodlab.paper_tables`` rewrites every table in the docs
between its markers::

    <!-- paper-table:KEY -->
    ...generated: the commands that made the runs, then mean (sd) [paper] per cell...
    <!-- /paper-table:KEY -->

so no figure is typed in by hand; ``--check`` exits 1 when a doc is not what the folders give
(a test runs it). Cells are mean (sd) over seeds (``oodlab.trials``), the paper's value in brackets.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from oodlab import seed_table, stores, trials

REPO = Path(__file__).resolve().parents[1]
HEADLINE_DOC = "README.md"  # one line per paper, between <!-- paper-table:headline --> markers


@dataclass(frozen=True)
class PaperTable:
    key: str  # the docs marker
    folder: str  # results/<folder>: one exported study per paper
    studies: tuple[str, ...]
    by: tuple[str, ...]  # params whose values label the rows ("" = one row per study)
    metrics: tuple[str, ...]
    paper: dict[str, dict[str, float]]  # row label -> metric -> the paper's figure
    commands: tuple[str, ...]  # what made the runs (run from the repo root)
    percent: bool = False
    headers: tuple[str, ...] = ()  # column titles (default: the metric names)
    notes: str = ""  # one line under the table: scale, what differs from the paper
    docs: tuple[str, ...] = field(default=("docs/results.md",))
    # README's one-line summary: (what it shows, [(row label, metric), ...]) shown as "a / b / …"
    headline: tuple[str, tuple[tuple[str, str], ...]] = ("", ())


def _label(study: str, params: dict[str, str], by: tuple[str, ...], several: bool) -> str:
    parts = [f"{k}={params.get(k, '')}" for k in by]
    return " ".join(([study] if several or not parts else []) + parts)


Rows = dict[str, trials.Configuration]  # row label -> its configuration's replicates, in label order


def read(table: PaperTable, root: Path = REPO) -> Rows:
    """Every configuration of the table's studies from ``results/<folder>``, by row label."""
    from mlflow.tracking import MlflowClient

    folder = root / "results" / table.folder
    if not (folder / "mlflow.db").is_file():
        raise FileNotFoundError(f"{folder / 'mlflow.db'} is missing: export the study there "
                                f"(oodlab export STUDY {folder})")
    client = MlflowClient(stores.default_mlflow_uri(folder))
    found: Rows = {}
    for study in table.studies:
        for conf in trials.read(client, study).configurations():
            label = _label(study, conf.params, table.by, len(table.studies) > 1)
            if label in found:
                raise ValueError(f"table {table.key}: two configurations are row {label!r}; add the parameter "
                                 "they differ in to `by`")
            found[label] = conf
    return dict(sorted(found.items()))


def seeds(table: PaperTable, conf: trials.Configuration) -> int:
    return max((len(conf.values(m)) for m in table.metrics), default=0)


def rows(table: PaperTable, root: Path = REPO) -> list[tuple[str, int, list[str]]]:
    """(row label, seeds, mean (sd) [paper] cells) per configuration of the table's studies."""
    return _rows(table, read(table, root))


def _rows(table: PaperTable, found: Rows) -> list[tuple[str, int, list[str]]]:
    return [(label, seeds(table, conf),
             [seed_table.cell(conf.values(m), table.paper.get(label, {}).get(m), table.percent) for m in table.metrics])
            for label, conf in found.items()]


def render(table: PaperTable, found: Rows) -> str:
    """The generated block: commands, then the markdown table and its note."""
    head = ["run", "seeds", *(table.headers or table.metrics)]
    lines = ["```bash", *table.commands, f"oodlab report {table.studies[0]} --storage results/{table.folder}",
             "```", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join([label, str(n), *cells]) + " |" for label, n, cells in _rows(table, found)]
    scale = " (×100)" if table.percent else ""
    lines += ["", f"Mean (sd) over seeds{scale} [paper]; from `results/{table.folder}`. {table.notes}".rstrip()]
    return "\n".join(lines)


def _figure(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3f}"


def render_headline(tables: list[PaperTable], found: dict[str, Rows]) -> str:
    """README's table: one line per paper (``found``: each table's rows by key), its headline cells
    beside the paper's."""
    lines = ["| paper | headline | ours, mean (sd) over seeds | paper |", "| --- | --- | --- | --- |"]
    for t in tables:
        what, cells = t.headline
        if not cells:
            continue
        got = found[t.key]
        ours = " / ".join(seed_table.cell(got[label].values(m), None, t.percent) if label in got else "—"
                          for label, m in cells)
        paper = " / ".join(_figure(t.paper.get(label, {}).get(m)) for label, m in cells)
        n = min((seeds(t, got[label]) for label, _ in cells if label in got), default=0)
        lines.append(f"| {t.key} | {what}, {n} seeds (`results/{t.folder}`) | {ours} | {paper} |")
    return "\n".join(lines)


def splice(text: str, key: str, block: str) -> str:
    """``text`` with the block between KEY's markers replaced; ValueError when the markers are missing."""
    start, end = f"<!-- paper-table:{key} -->", f"<!-- /paper-table:{key} -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {start} … {end} markers")
    return pattern.sub(lambda _: f"{start}\n{block}\n{end}", text, count=1)


def update(tables: list[PaperTable], root: Path = REPO, check: bool = False) -> list[str]:
    """Write ``tables`` into their docs and README's headline table (always every paper's line, so
    ``--only`` drops none); returns the files that changed (with ``check``: would change)."""
    headline = [t for t in TABLES if t.headline[1]]
    found = {t.key: read(t, root) for t in {t.key: t for t in [*tables, *headline]}.values()}  # each study once
    changed = []
    for doc in sorted({d for t in tables for d in t.docs} | {HEADLINE_DOC}):
        path = root / doc
        before = text = path.read_text()
        for t in (t for t in tables if doc in t.docs):
            text = splice(text, t.key, render(t, found[t.key]))
        if doc == HEADLINE_DOC:
            text = splice(text, "headline", render_headline(headline, found))
        if text != before:
            changed.append(doc)
            if not check:
                path.write_text(text)
    return changed


# ---------------------------------------------------------------- the tables (data)

_COMMON = "--address local --gpus-per-trial 0 --max-concurrent 1 --cpus-per-trial 1"
_NOISE = "gaussian_noise"
TABLES = [
    PaperTable(
        key="000", folder="negprior-table1", studies=("negprior-table1",), by=("negatives",),
        metrics=("auroc_mnist_bpd", "auroc_mnist_kl", "val_auroc_constant_bpd"),
        headers=("AUC-BPD (MNIST)", "AUC-KL (MNIST)", "val AUROC constant (selection)"),
        paper={"negatives=none": {"auroc_mnist_bpd": 0.46, "auroc_mnist_kl": 0.61},
               "negatives=aux": {"auroc_mnist_bpd": 1.00, "auroc_mnist_kl": 1.00}},
        commands=(f"python studies/negprior_sources.py --name negprior-table1 --aux omniglot --aux-split train "
                  f"--negatives none,aux --decoders bernoulli --seeds 3 --train-n 20000 --epochs 5 --eval-every 5 "
                  f"--pad {_COMMON} "
                  "--storage RUNS/negprior-table1",
                  "oodlab export negprior-table1 results/negprior-table1 --storage RUNS/negprior-table1"),
        notes="Paper 000 Table I (Bernoulli decoder, Fashion-MNIST → MNIST); aux = Omniglot (offline stand-in "
              "for EMNIST-Letters).",
        headline=("Table I: AUC-BPD, AUC-KL; baseline, aux", (
            ("negatives=none", "auroc_mnist_bpd"), ("negatives=aux", "auroc_mnist_bpd"),
            ("negatives=none", "auroc_mnist_kl"), ("negatives=aux", "auroc_mnist_kl"))),
    ),
    PaperTable(
        key="001-003", folder="mixture-table1", studies=("mixture-vae", "mixture-glow"), by=("components",),
        metrics=("nll_mean_id", "nll_mean_mnist", "auroc_mnist_nll"),
        headers=("ID NLL (nats)", "MNIST NLL (nats)", "AUROC MNIST"),
        paper={"mixture-vae components=1": {"nll_mean_mnist": 1647.8},
               "mixture-vae components=2": {"nll_mean_mnist": 2822.0},
               "mixture-glow components=1": {"nll_mean_mnist": 1372.2},
               "mixture-glow components=2": {"nll_mean_mnist": 2679.9}},
        commands=(f"python studies/mixture_distance.py --name mixture-glow --models glow --components 1,2 "
                  f"--distances 100 --seeds 3 --epochs 5 --eval-every 5 --test-n 2000 {_COMMON} "
                  "--storage RUNS/mixture-table1",
                  f"python studies/mixture_distance.py --name mixture-vae --models vae --components 1,2 "
                  f"--distances 150 --seeds 3 --epochs 3 --train-n 2000 --test-n 300 --is-samples 4 "
                  f"--eval-every 3 {_COMMON.replace('--max-concurrent 1', '--max-concurrent 2')} "
                  "--storage RUNS/mixture-table1",
                  "oodlab export mixture-vae results/mixture-table1 --storage RUNS/mixture-table1",
                  "oodlab export mixture-glow results/mixture-table1 --storage RUNS/mixture-table1"),
        notes="Papers 001/003 Table 1 (Fashion-MNIST {1, 7} → MNIST); components=2 is the bimodal prior "
              "(VAE d = 150, Glow d = 100).",
        headline=("Table 1: MNIST NLL, standard vs bimodal; VAE, Glow", (
            ("mixture-vae components=1", "nll_mean_mnist"), ("mixture-vae components=2", "nll_mean_mnist"),
            ("mixture-glow components=1", "nll_mean_mnist"), ("mixture-glow components=2", "nll_mean_mnist"))),
    ),
    PaperTable(
        key="002", folder="oodgen-table1", studies=("oodgen-table1",), by=(),
        metrics=("auroc_mnist_n1_prob", "auroc_notmnist_n1_prob", f"auroc_{_NOISE}_n1_prob", "acc_n1",
                 "fpr95_mnist_n1_prob"),
        headers=("AUROC MNIST", "AUROC notMNIST", "AUROC Gaussian noise", "accuracy (6-way)", "FPR95 MNIST"),
        paper={"oodgen-table1": {"auroc_mnist_n1_prob": 0.995, "auroc_notmnist_n1_prob": 0.999,
                                 f"auroc_{_NOISE}_n1_prob": 1.000, "acc_n1": 0.948, "fpr95_mnist_n1_prob": 0.018}},
        commands=(f"python studies/cvae_oodgen.py --name oodgen-table1 --paper-point --seeds 3 --train-n 5000 "
                  f"--cvae-epochs 10 --epochs 3 --eval-every 3 --no-baselines --test-n 1000 {_COMMON} "
                  "--storage RUNS/oodgen-table1",
                  "oodlab export oodgen-table1 results/oodgen-table1 --storage RUNS/oodgen-table1"),
        notes="Paper 002 Table 1 (FMNIST0-4, the (n+1) classifier's n1_prob); FPR95 ID-positive, as the paper's "
              "notebook.",
        headline=("Table 1: (n+1) AUROC MNIST, notMNIST, noise; accuracy", tuple(
            ("oodgen-table1", m) for m in ("auroc_mnist_n1_prob", "auroc_notmnist_n1_prob", f"auroc_{_NOISE}_n1_prob",
                                           "acc_n1"))),
    ),
    PaperTable(
        key="004", folder="rose-tables2-5", studies=("rose-tables2-5",), by=(),
        metrics=("auroc_mnist_rose_ekfac", "auroc_overall_rose_ekfac", "fpr80_oodpos_mnist_rose_ekfac",
                 "fpr80_oodpos_overall_rose_ekfac", "auroc_mnist_rose_diag", "auroc_mnist_nll"),
        headers=("AUROC MNIST", "AUROC overall", "FPR80 MNIST", "FPR80 overall", "AUROC MNIST (diag)",
                 "AUROC MNIST (NLL)"),
        paper={"rose-tables2-5": {"auroc_mnist_rose_ekfac": 0.995, "auroc_overall_rose_ekfac": 0.998,
                                  "fpr80_oodpos_mnist_rose_ekfac": 0.007, "fpr80_oodpos_overall_rose_ekfac": 0.002}},
        commands=(f"python studies/rose_perturbation.py --name rose-tables2-5 --scores rose_diag,rose_ekfac,nll "
                  f"--seeds 3 --train-n 5000 --epochs 3 --fisher-n 2000 --iwae-k 10 --test-n 500 --bright= "
                  f"{_COMMON} --storage RUNS/rose-tables2-5",
                  "oodlab export rose-tables2-5 results/rose-tables2-5 --storage RUNS/rose-tables2-5"),
        notes="Paper 004 Tables 2 and 5 (ROSE EKFAC unless named; FPR80 OOD-positive, `fpr80_oodpos`, the "
              "paper's convention).",
        headline=("Tables 2, 5: ROSE EKFAC AUROC MNIST, overall; FPR80", tuple(
            ("rose-tables2-5", m) for m in ("auroc_mnist_rose_ekfac", "auroc_overall_rose_ekfac",
                                            "fpr80_oodpos_mnist_rose_ekfac", "fpr80_oodpos_overall_rose_ekfac"))),
    ),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m oodlab.paper_tables", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if a doc differs from what results/ gives")
    p.add_argument("--only", default="", help="table keys, comma-separated (default: all)")
    p.add_argument("--commands", metavar="RUNS", help="print the commands that make the tables' runs, with their "
                   "stores under the folder RUNS (then export them into results/), and exit")
    a = p.parse_args(argv)
    keys = {k for k in a.only.split(",") if k}
    unknown = keys - {t.key for t in TABLES}
    if unknown:
        print(f"error: unknown table {', '.join(sorted(unknown))}; known: {', '.join(t.key for t in TABLES)}",
              file=sys.stderr)
        return 2
    chosen = [t for t in TABLES if not keys or t.key in keys]
    if a.commands:
        for t in chosen:
            print("\n".join(c.replace("RUNS", a.commands) for c in t.commands))
        return 0
    try:
        changed = update(chosen, check=a.check)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for doc in changed:
        print(f"{'stale' if a.check else 'updated'}: {doc}")
    return 1 if a.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
