"""The `oodlab` command and cluster.yaml (validated by Ray's own schema, no cloud calls)."""


import yaml
from conftest import REPO, oodlab_here


def test_cluster_yaml_validates_with_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(cfg))
    workers = cfg["available_node_types"]["gpu_worker"]
    assert workers["resources"]["GPU"] >= 1 and workers["min_workers"] == 0
    assert any("--host 127.0.0.1" in c and "oodlab.tracking_server" in c
               for c in cfg["head_setup_commands"])  # the watched MLflow server, localhost only
    text = (REPO / "cluster.yaml").read_text()
    assert not any(k in text for k in ("aws_secret_access_key", "aws_access_key_id", "AKIA"))  # no credentials


def _oodlab(capsys, *args) -> tuple[int, str, str]:
    out = oodlab_here(capsys, *args)
    return out.returncode, out.stdout, out.stderr


def test_cli_errors_and_list(tmp_path, capsys):
    code, _, err = _oodlab(capsys, "run", "no_such_study")
    assert code == 2 and "unknown study 'no_such_study'" in err and "negprior_shift" in err
    code, out, _ = _oodlab(capsys, "list", "--storage", tmp_path)
    assert code == 1 and "no studies" in out
    code, _, err = _oodlab(capsys, "ui", "--storage", tmp_path)
    assert code == 2 and "no MLflow store" in err
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment("real_study")
    code, _, err = _oodlab(capsys, "report", "no_such_study", "--storage", tmp_path)
    assert code == 2
    assert err.strip().splitlines() == [f"error: no study 'no_such_study' under {tmp_path}; known: real_study"]
    import optuna

    s = optuna.create_study(study_name="demo", storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="maximize")
    s.enqueue_trial({"x": 1.0})
    s.optimize(lambda t: t.suggest_float("x", 0, 2), n_trials=2)
    code, out, _ = _oodlab(capsys, "list", "--storage", tmp_path)
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("demo"))
    assert row.split()[1:5] == ["2", "0", "0", "0"] and row.split()[6] == "no"  # complete running failed pruned


def test_cli_run_passes_flags_through(tmp_path, capsys):
    code, _, err = _oodlab(capsys, "run", "negprior_shift", "--smoke", "--storage", tmp_path / "r", "--ood", "bogus")
    assert code == 2 and "unknown dataset 'bogus'" in err


def test_optuna_summary_ranks_trials_and_reports_importance(tmp_path):
    import optuna

    from oodlab.cli import optuna_summary

    s = optuna.create_study(study_name="imp", storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="maximize")
    s.optimize(lambda t: t.suggest_float("x", 0, 1) + 0.0 * t.suggest_int("noise", 0, 3), n_trials=8)
    text = optuna_summary(tmp_path, "imp", top=3)
    values = [float(line.split("|")[2]) for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(values) == 3 and values == sorted(values, reverse=True) and values[0] == round(s.best_value, 4)
    imp = dict(line[2:].split(": ") for line in text.splitlines() if line.startswith("- "))
    assert float(imp["x"]) > float(imp["noise"])  # only x moves the objective
