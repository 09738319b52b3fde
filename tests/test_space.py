"""Search spaces as data: spec parsing, typing by the config dataclass, grids, and real Optuna suggestions."""

import optuna
import pytest

from oodlab.methods.negprior import Config
from oodlab.space import (
    Categorical,
    DefineByRun,
    FloatRange,
    IntRange,
    SpaceError,
    coerce,
    field_types,
    grid_size,
    grid_values,
    parse_dimension,
    typed,
)


@pytest.mark.parametrize("spec,dim", [
    ("2,4,6", Categorical((2, 4, 6))),
    ("bernoulli,gaussian", Categorical(("bernoulli", "gaussian"))),
    ("2..10", FloatRange(2.0, 10.0)),
    ("1e-5..1e-3:log", FloatRange(1e-5, 1e-3, log=True)),
    ("2..8:int", IntRange(2, 8)),
    ("100..10000:int:log", IntRange(100, 10000, log=True)),
])
def test_parse_dimension(spec, dim):
    assert parse_dimension(spec) == dim


@pytest.mark.parametrize("spec,match", [
    ("10..2", "lo must be below hi"), ("0..1:log", "lo > 0"), ("a..b", "numbers"), ("1..2:cube", "unknown option"),
    ("1.5..3:int", "numbers"), (",", "empty"),
])
def test_bad_specs_are_refused(spec, match):
    with pytest.raises(SpaceError, match=match):
        parse_dimension(spec)


def test_values_are_typed_by_the_config_field():
    types = field_types(Config)
    assert coerce(types["shift"], "4", "shift") == 4.0 and isinstance(coerce(types["shift"], "4", "shift"), float)
    assert coerce(types["eubo"], "true", "eubo") is True
    assert coerce(types["train_n"], "none", "train_n") is None and coerce(types["train_n"], "30", "train_n") == 30
    assert typed(Categorical((2, 4)), types["shift"], "shift") == Categorical((2.0, 4.0))
    with pytest.raises(SpaceError, match="not an integer"):
        coerce(types["epochs"], "2.5", "epochs")
    with pytest.raises(SpaceError, match="float field"):
        typed(FloatRange(1, 2), types["epochs"], "epochs")
    with pytest.raises(SpaceError, match="numeric field"):
        typed(IntRange(1, 2), types["decoder"], "decoder")


def test_grid_needs_lists_for_float_ranges():
    space = {"shift": Categorical((2.0, 8.0)), "latent_dim": IntRange(2, 4)}
    assert grid_values(space) == {"shift": [2.0, 8.0], "latent_dim": [2, 3, 4]} and grid_size(space) == 6
    with pytest.raises(SpaceError, match="--space shift=2,6,10"):
        grid_values({"shift": FloatRange(2, 10)})
    assert grid_size({"shift": FloatRange(2, 10)}) is None


def test_define_by_run_samples_inside_the_ranges_with_optuna():
    space = {"shift": FloatRange(2, 10), "lr": FloatRange(1e-5, 1e-3, log=True), "k": IntRange(1, 3),
             "decoder": Categorical(("bernoulli", "gaussian"))}
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=3))
    fn = DefineByRun.of(space)
    study.optimize(lambda t: (fn(t), -abs(t.params["shift"] - 7.3))[1], n_trials=12)
    shifts = [t.params["shift"] for t in study.trials]
    assert all(2 <= s <= 10 for s in shifts) and any(not float(s).is_integer() for s in shifts)
    assert all(1e-5 <= t.params["lr"] <= 1e-3 and t.params["k"] in (1, 2, 3) for t in study.trials)
    assert isinstance(study.trials[0].distributions["lr"], optuna.distributions.FloatDistribution)
    assert study.trials[0].distributions["lr"].log
