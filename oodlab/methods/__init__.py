"""OOD methods: one module per paper. A method never imports Ray, Optuna or MLflow.

A method module provides ``Config`` (a ``oodlab.experiment.TrialConfig`` subclass) and
``Experiment`` (an ``oodlab.experiment.Experiment`` subclass); the trainable, tracking
and study runner pick them by the config's ``method`` key. The registry is an explicit
dict, filled at import with no side effects.
"""

from oodlab.methods import mixture, negprior, oodgen, rose

METHODS = {"mixture": mixture, "negprior": negprior, "oodgen": oodgen, "rose": rose}


def get(name: str):
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}") from None
