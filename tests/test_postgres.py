"""Durable, shared stores for real: studies against a PostgreSQL server the suite starts itself
(Optuna, and MLflow behind a tracking server), Ctrl-C + --resume there, stores remembered, two
studies at once on one store (one of them multi-objective), `oodlab export` read back and opened
elsewhere, Optuna's journal file storage, and bad store URLs refused."""

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    REPO,
    end_group,
    kill_leftovers,
    oodlab_here,
    start_study,
    study_env,
    tracking_server_watcher,
    wait_for,
    wait_until,
)
from pg_server import pg_fixture  # noqa: F401 - registers the module-scoped fixture `pg`
from ray_head import free_port

from oodlab import data, stores, tracking_server

STUDY = REPO / "studies" / "negprior_shift.py"
TINY = ["--epochs", "2", "--train-n", "300", "--test-n", "100"]


def pg_states(url: str) -> list[str]:
    """States of the Optuna trials in a PostgreSQL storage (cheap to poll)."""
    import psycopg

    try:
        with psycopg.connect(url) as c:
            return [r[0] for r in c.execute("select state from trials")]
    except psycopg.errors.UndefinedTable:
        return []


def _trials(storage, study):
    import optuna

    return optuna.load_study(study_name=study, storage=storage).trials


def _runs(uri, study):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(study).experiment_id])
    by_role = {role: [r for r in runs if r.data.tags.get("oodlab.role") == role] for role in ("parent", "trial")}
    return client, by_role["parent"], by_role["trial"]


@pytest.mark.slow
def test_study_on_postgres_and_a_tracking_server_survives_ctrl_c_then_reports_and_exports(tmp_path, ray_tmp, pg,
                                                                                        capsys):
    """A grid study of two seeds per trial as on a cluster: Optuna on PostgreSQL (its URL carries a
    password, written down nowhere), MLflow through a tracking server backed by PostgreSQL and kept
    up by the watcher, checkpoints on a separate (shared) path, a user's npz OOD set. Ctrl-C once a
    trial is COMPLETE (exit 130, naming --resume), then --resume; then `oodlab list/report/export`
    with `--storage` alone (the study wrote its stores down). SIGKILL + resume: tests/test_study.py."""
    ot, ml = pg.createdb("optuna_e2e"), pg.createdb("mlflow_e2e")
    secret = ot.replace("postgres@", "postgres:hunter2@")  # the test server trusts any password
    storage, nfs, npz = tmp_path / "r", tmp_path / "nfs", tmp_path / "digits.npz"
    np.savez(npz, x=data.load("mnist", "test").x[-300:, 0].numpy())  # a user set, N×H×W uint8
    port = free_port()
    server = tracking_server_watcher(port, tmp_path / "state", "--backend-store-uri", ml, "--artifacts-destination",
                                     tmp_path / "artifacts")
    try:
        wait_for(lambda: tracking_server.healthy("127.0.0.1", port), "the MLflow server answers /health")
        uri = f"http://127.0.0.1:{port}"
        _ctrl_c_resume_report_export(tmp_path, ray_tmp, [
            sys.executable, STUDY, "--storage", storage, "--name", "pg", "--shifts", "2,4", *TINY,
            "--max-concurrent", "1", "--optuna-storage", secret, "--mlflow-uri", uri, "--checkpoint-storage", nfs,
            "--ood", f"mnist,npz:{npz}", "--seeds", "2"], ot, uri, capsys)
    finally:
        end_group(server)


def _ctrl_c_resume_report_export(tmp_path, ray_tmp, args, ot, ml, capsys):
    storage, nfs = tmp_path / "r", tmp_path / "nfs"
    proc = start_study(args, ray_tmp)
    wait_until(proc, lambda: pg_states(ot).count("COMPLETE") >= 1, "a trial COMPLETE")
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    rc, log = proc.wait(timeout=120), proc.stdout.read().decode()
    kill_leftovers(ray_tmp, proc.pid)
    assert rc == 130 and "--resume" in log, log[-3000:]
    assert pg_states(ot).count("COMPLETE") < 2, "the Ctrl-C came too late to test resume"
    finished = {p.parent.name for p in (nfs / "pg").glob("trial_*/result.json") if len(p.read_text().splitlines()) == 2}

    out = subprocess.run(list(map(str, args + ["--resume"])), env=study_env(ray_tmp), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "best val_auroc_" in out.stdout  # the default target is a validation metric
    assert not (storage / "optuna.db").exists() and not (storage / "mlflow.db").exists()  # the servers hold them
    assert "hunter2" not in log + out.stdout + out.stderr
    files = [p for p in storage.rglob("*") if p.is_file() and p.stat().st_size < 10**7]
    assert not [p for p in files if b"hunter2" in p.read_bytes()], "a password was written to the results"
    assert json.loads((storage / "stores.json").read_text())["pg"] == {
        "optuna_storage": ot, "mlflow_uri": ml, "checkpoint_storage": str(nfs)}

    # Ray: every trial reached its last epoch, none trained an epoch twice, and those that had
    # finished before the Ctrl-C trained nothing more (a replayed final report is not training).
    trial_dirs = sorted((nfs / "pg").glob("trial_*"))
    assert len(trial_dirs) == 2
    for d in trial_dirs:
        rows = [json.loads(line) for line in (d / "result.json").read_text().splitlines()]
        trained = [r["epoch"] for r in rows if not r.get("replayed")]
        assert rows[-1]["epoch"] == 2 and len(trained) == len(set(trained)), trained
        # a replayed report is the report first made (loss terms too): MLflow logs it if it never saw it
        assert all("loss" in r for r in rows), rows
        if d.name in finished:
            assert trained == [1, 2], f"{d.name} finished before the Ctrl-C but trained again: {trained}"

    trials = _trials(ot, "pg")  # one COMPLETE trial per grid point, none left RUNNING
    assert sorted(t.params["shift"] for t in trials if t.state.name == "COMPLETE") == [2.0, 4.0]
    assert "RUNNING" not in {t.state.name for t in trials}
    assert all(set(t.params) == {"shift"} for t in trials)  # seeds are replicates, never searched
    client, parents, children = _runs(ml, "pg")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    for r in children:  # the trial's run: the mean over its seeds; a nested run per seed with its own figures
        assert [m.step for m in client.get_metric_history(r.info.run_id, "loss")] == [1, 2]
        assert 0.0 <= r.data.metrics["auroc_digits_bpd"] <= 1.0  # the npz OOD set is scored on its own
        assert "auroc_digits_bpd_sd" in r.data.metrics and "metrics.json" in {
            a.path for a in client.list_artifacts(r.info.run_id)}
        seeds = client.search_runs([r.info.experiment_id], f"tags.`mlflow.parentRunId` = '{r.info.run_id}'")
        assert sorted(s.data.tags["oodlab.seed"] for s in seeds) == ["0", "1"]
        assert {s.info.status for s in seeds} == {"FINISHED"}
        assert r.data.metrics["auroc_digits_bpd"] == pytest.approx(
            np.mean([s.data.metrics["auroc_digits_bpd"] for s in seeds]), abs=1e-6)
        for s in seeds:  # each seed's epochs logged once, its figures and scores on its own run
            assert [m.step for m in client.get_metric_history(s.info.run_id, "loss")] == [1, 2]
            files = {a.path for a in client.list_artifacts(s.info.run_id)}
            assert {"roc.png", "scores_hist.png", "scores.npz", "metrics.json"} <= files

    # export, move the folder (another machine), read it back and open it with `oodlab ui`
    exported = tmp_path / "export"
    oodlab = lambda *a: oodlab_here(capsys, *a)  # in process: no interpreter start per command
    listed = oodlab("list", "--storage", storage)  # the stores it wrote down: --storage alone
    assert listed.returncode == 0 and re.search(r"^pg\s+2\s", listed.stdout, re.M), listed.stdout + listed.stderr
    report = oodlab("report", "pg", "--storage", storage)
    assert report.returncode == 0 and "Best trials" in report.stdout, report.stdout[-2000:] + report.stderr[-2000:]
    wrong = oodlab("report", "pg", "--storage", storage, "--optuna-storage",  # the flags still win
                   f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/x")
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1 and "hunter2" not in wrong.stderr
    out = oodlab("export", "pg", exported, "--storage", storage)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 Optuna trials, 7 MLflow runs" in out.stdout, out.stdout  # parent, 2 trials, 4 seed runs
    moved = tmp_path / "elsewhere"
    shutil.move(exported, moved)
    ex_trials = _trials(stores.default_optuna_url(moved), "pg")
    assert [(t.number, t.state.name, t.params, t.value) for t in ex_trials] == \
        [(t.number, t.state.name, t.params, t.value) for t in trials]
    ex_client, ex_parents, ex_children = _runs(stores.default_mlflow_uri(moved), "pg")
    assert len(ex_parents) == 1 and len(ex_children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in ex_children} == {ex_parents[0].info.run_id}
    src_by_name = {r.info.run_name: r for r in children}
    for r in ex_children:
        src = src_by_name[r.info.run_name]
        assert r.info.status == "FINISHED" and r.data.params == src.data.params and r.data.metrics == src.data.metrics
        assert [m.step for m in ex_client.get_metric_history(r.info.run_id, "loss")] == [1, 2]
        ex_seeds = ex_client.search_runs([r.info.experiment_id], f"tags.`mlflow.parentRunId` = '{r.info.run_id}'")
        assert len(ex_seeds) == 2  # the seed runs nest under their exported trial run
    out = oodlab("list", "--storage", moved)
    assert out.returncode == 0 and next(ln for ln in out.stdout.splitlines() if ln.startswith("pg")).split()[1] == "2"

    # what `oodlab ui --storage DIR` serves (--artifacts-destination DIR/mlartifacts): each run's
    # mlflow-artifacts:/ URI resolves inside the moved folder, with the source run's files
    for r in ex_children:
        assert r.info.artifact_uri.startswith("mlflow-artifacts:/")
        local = moved / "mlartifacts" / r.info.artifact_uri.removeprefix("mlflow-artifacts:/")
        src = src_by_name[r.info.run_name]
        assert {a.path for a in client.list_artifacts(src.info.run_id)} <= {p.name for p in local.iterdir()}
        assert json.loads((local / "metrics.json").read_text()) == json.loads(
            Path(client.download_artifacts(src.info.run_id, "metrics.json", str(tmp_path))).read_text())


@pytest.mark.slow
def test_two_studies_at_once_share_one_store(tmp_path, ray_tmp, pg):
    """Same --storage folder (one sqlite mlflow.db, created by both at once) and one fresh
    PostgreSQL Optuna database: both studies finish. The second is a multi-objective search: its
    Pareto front is printed, stored by Optuna and logged on its parent run."""
    ot = pg.createdb("optuna_shared")
    storage = tmp_path / "shared"

    def start(name, *flags):
        return start_study([sys.executable, STUDY, "--storage", storage, "--name", name, "--epochs", "1",
                            "--train-n", "300", "--test-n", "100", "--optuna-storage", ot, *flags], ray_tmp)

    procs = [start("first", "--shifts", "2"),
             start("mo", "--sampler", "tpe", "--num-samples", "2", "--target", "val_auroc_blobs_bpd,val_id_bpd",
                   "--set", "val_n=100", "--max-concurrent", "1")]
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    assert "Pareto front (val_auroc_blobs_bpd max, val_id_bpd min)" in logs[1]  # modes inferred
    for name, n in (("first", 1), ("mo", 2)):
        assert [t.state.name for t in _trials(ot, name)] == ["COMPLETE"] * n
        _, parents, children = _runs(stores.default_mlflow_uri(storage), name)
        assert len(parents) == 1 and [r.info.status for r in children] == ["FINISHED"] * n

    import optuna

    study = optuna.load_study(study_name="mo", storage=ot)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    front = {t.number for t in study.best_trials}
    client, (parent,), _ = _runs(stores.default_mlflow_uri(storage), "mo")
    assert {"pareto_front.md", "trials.md"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "search/pareto_front.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
    md = Path(client.download_artifacts(parent.info.run_id, "pareto_front.md", str(tmp_path))).read_text()
    assert {int(line.split("|")[1]) for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()} == front


def test_bad_or_unreachable_store_is_refused_before_compute(tmp_path, pg, capsys):
    """In-process (one import of the stack for all cases): the study's own main, before Ray starts."""
    import importlib.util

    import optuna

    ot = pg.createdb("optuna_taken")
    optuna.create_study(study_name="taken", storage=ot)
    spec = importlib.util.spec_from_file_location("negprior_shift_study", STUDY)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    for flags, match in [
        (["--optuna-storage", "redis://127.0.0.1:1/0"], "expected sqlite:///"),
        (["--optuna-storage", "journal://relative.log"], "absolute path"),
        (["--optuna-storage", f"postgresql://postgres:secret@127.0.0.1:{free_port()}/x"], "cannot reach the database"),
        (["--mlflow-uri", f"postgresql://postgres@127.0.0.1:{pg.port}/no_such_db"], "cannot reach"),
        (["--optuna-storage", ot, "--name", "taken"], "already exists in --optuna-storage"),
    ]:
        argv = ["--smoke", "--train-n", "100", "--test-n", "50", "--storage", str(tmp_path / "r"), *flags]
        assert study.main(str(STUDY), study.build, study.configure, argv) == 2
        err = capsys.readouterr().err
        assert match in err and "secret" not in err, err[-2000:]  # passwords are not printed
        assert not (tmp_path / "r").exists()
    out = oodlab_here(capsys, "list", "--optuna-storage", f"postgresql://postgres:secret@127.0.0.1:{free_port()}/x")
    assert out.returncode == 2 and "cannot reach the database" in out.stderr and "secret" not in out.stderr


def test_journal_file_storage_round_trip(tmp_path):
    """Optuna's journal file storage (the NFS-safe choice): trials persist across processes and the
    storage pickles (Tune saves the searcher, storage included)."""
    import optuna

    url = stores.optuna_url(f"journal://{tmp_path}/nfs/optuna.log", tmp_path)
    s = optuna.create_study(study_name="j", storage=stores.optuna_storage(url), direction="maximize")
    s.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    pickle.loads(pickle.dumps(stores.optuna_storage(url)))
    code = ("import optuna, sys; from oodlab import stores; "
            f"print(len(optuna.load_study(study_name='j', storage=stores.optuna_storage({url!r})).trials))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "3", out.stderr
