"""Names of what a trial reports, and what they mean: one home for each rule.

* metric names: ``{metric}_{set}_{score}`` (ID test vs a test OOD set), ``val_{metric}_{set}_{score}``
  (ID validation vs a validation OOD set), ``val_id_{score}`` (mean score of the ID validation images);
  with replicates, ``{name}_sd`` is the standard deviation over seeds of ``{name}``;
* data specs: ``split_specs`` splits a comma list of them, ``set_key`` names one in metrics;
* ``mode_of``: whether a metric is better high or low (a study's default ``--mode``, selection, report);
* ``NOT_HYPERPARAMETERS``: config fields that do not define a configuration (seeds, devices, caches),
  so trials that differ only in them are replicates of one configuration.
"""

from __future__ import annotations

import re

VAL = "val_"  # prefix of validation sets' score keys and metric names
SD = "_sd"  # suffix of a metric's standard deviation over a trial's seeds

# Prefixes (after ``val_``) of metrics where lower is better: error rates, the ID images' mean score
# (val_id_bpd), likelihood-style means (nll, bpd), losses.
LOWER_IS_BETTER = ("fpr", "detection_error", "error", "id_", "nll", "bpd", "loss")

# Config fields that are not hyperparameters: how many replicates and which seed, where and how a
# trial runs, how often it evaluates, caches. Grouping, selection and reports ignore them.
NOT_HYPERPARAMETERS = frozenset({"seed", "seeds", "fuse", "device", "eval_every", "eval_batch_size", "vae_cache"})


def mode_of(metric: str) -> str:
    """"min" for error rates, ID mean scores, likelihood-style means and losses; "max" otherwise."""
    return "min" if metric.removeprefix(VAL).startswith(LOWER_IS_BETTER) else "max"


def split_specs(text: str) -> list[str]:
    """Split a comma-separated list of specs, keeping commas inside [...] modifiers."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return [s for s in out if s]


def set_key(spec: str) -> str:
    """A short metric-safe name for a data spec: ``npz:/a/b/x.npz`` -> ``x``, ``mnist[n=5]`` -> ``mnist_n_5``."""
    if spec.startswith("npz:"):
        path, _, mods = spec[4:].partition("[")
        spec = path.rsplit("/", 1)[-1].removesuffix(".npz") + ("[" + mods if mods else "")
    return re.sub(r"[^0-9a-zA-Z]+", "_", spec).strip("_").lower()


def metric_name(metric: str, ood: str, score: str, split: str = "test") -> str:
    """Flat name of one number of the metric table: ``auroc_mnist_bpd`` (ID test vs a test OOD set)
    or, with split="val", ``val_auroc_blobs_bpd`` (ID validation vs a validation OOD set)."""
    if split not in ("test", "val"):
        raise ValueError(f"split must be test or val, got {split!r}")
    return f"{VAL if split == 'val' else ''}{metric}_{set_key(ood)}_{score}"


def val_id_name(score: str) -> str:
    """Name of the mean score of the ID validation images, e.g. ``val_id_bpd`` (a second objective)."""
    return f"{VAL}id_{score}"


def is_val_metric(name: str) -> bool:
    """Whether a flat metric name is measured on validation sets (and may be used for selection)."""
    return name.startswith(VAL)


def score_key(spec: str, split: str = "test") -> str:
    """Key of a set in a trial's scores: ``mnist`` for a test OOD set, ``val_blobs`` for a validation one."""
    return (VAL if split == "val" else "") + set_key(spec)
