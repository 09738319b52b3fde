"""OOD methods: one module per paper. A method never imports Ray, Optuna or MLflow.

A method module provides ``loss(model, x, x_neg, cfg) -> dict[str, Tensor]`` whose
``"loss"`` entry is minimized, and relies on ``oodlab.scores`` for its scores.
The registry is an explicit dict, filled at import with no side effects.
"""

from oodlab.methods import negprior

METHODS = {"negprior": negprior}


def get(name: str):
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}") from None
