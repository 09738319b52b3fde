"""oodlab.seed_table: mean (sd) over seeds from real MLflow child runs, paper figures beside them."""

import mlflow
import numpy as np
import pytest

from oodlab import seed_table


def _study(storage, name, values):
    mlflow.set_tracking_uri(f"sqlite:///{storage / 'mlflow.db'}")
    exp = mlflow.create_experiment(name)
    for i, v in enumerate(values):
        with mlflow.start_run(experiment_id=exp, tags={"oodlab.role": "trial"}):
            mlflow.log_metrics({"auroc_mnist_rose": v, "seed": i})
    with mlflow.start_run(experiment_id=exp, tags={"oodlab.role": "parent"}):
        mlflow.log_metric("auroc_mnist_rose", 0.0)  # not a trial: ignored


def test_table_from_stored_runs(tmp_path, capsys):
    _study(tmp_path, "a", [0.9, 0.8, 0.7])
    _study(tmp_path, "b", [0.5])
    rc = seed_table.main(["--storage", str(tmp_path), "--studies", "a,b", "--metrics", "auroc_mnist_rose",
                          "--paper", "auroc_mnist_rose=0.995"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and out[0] == "| study | seeds | auroc_mnist_rose |"
    sd = np.std([0.9, 0.8, 0.7], ddof=1)
    assert out[2] == f"| a | 3 | 0.800 ({sd:.3f}) [0.995] |"
    assert out[3] == "| b | 1 | 0.500 [0.995] |"
    assert seed_table.cell([0.5, 0.7], 0.9, percent=True) == "60.0 (14.1) [90.0]"


@pytest.mark.parametrize("argv", [["--studies", "nope"], ["--studies", "a", "--paper", "x=bad"]])
def test_bad_input_exits_2(tmp_path, argv, capsys):
    _study(tmp_path, "a", [0.9])
    capsys.readouterr()  # MLflow's own set-up lines
    rc = seed_table.main(["--storage", str(tmp_path), "--metrics", "auroc_mnist_rose", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("seed_table:"), err
    assert seed_table.main(["--storage", str(tmp_path / "none"), "--studies", "a", "--metrics", "m"]) == 2
