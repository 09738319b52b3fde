"""The methods a trial can run: config key ``method`` -> (Config class, Experiment class).

Adding a method is one module in ``oodlab/methods/`` plus one line in ``METHODS`` here.
This module sits above the methods (it imports them; ``oodlab.experiment`` and the
methods never import it), so the import graph of ``oodlab/`` has no cycle. The
trainable, tracking and study runner build every trial through ``build_config`` / ``build``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from oodlab.experiment import ConfigError, EpochResult, Experiment, TrialConfig
from oodlab.methods import mixture, negprior, oodgen, rose


class Method(NamedTuple):
    config: type[TrialConfig]
    experiment: type[Experiment[Any]]


METHODS: dict[str, Method] = {
    "mixture": Method(mixture.Config, mixture.Experiment),
    "negprior": Method(negprior.Config, negprior.Experiment),
    "oodgen": Method(oodgen.Config, oodgen.Experiment),
    "rose": Method(rose.Config, rose.Experiment),
}


def get(name: str) -> Method:
    """The registered pair for ``name``; ConfigError (before any compute) for an unknown name."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; known: {sorted(METHODS)}") from None


def build_config(d: dict[str, Any] | TrialConfig) -> TrialConfig:
    """The method's own Config from a flat dict (as Tune and MLflow see it)."""
    if isinstance(d, TrialConfig):
        return d
    return get(d.get("method", TrialConfig.method)).config.from_dict(d)


def build(config: dict[str, Any] | TrialConfig) -> Experiment[Any]:
    """The method's Experiment for a config (data loaded, model built, nothing trained)."""
    cfg = build_config(config)
    return get(cfg.method).experiment(cfg)


def run_trial(
    config: dict[str, Any] | TrialConfig, on_epoch: Callable[[EpochResult], None] | None = None
) -> EpochResult:
    """Run a whole trial without Ray; returns the last epoch's result."""
    exp = build(config)
    res = None
    while not exp.done:
        res = exp.step()
        if on_epoch:
            on_epoch(res)
    assert res is not None  # cfg.epochs >= 1, checked by TrialConfig
    return res
