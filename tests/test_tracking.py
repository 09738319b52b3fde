"""MLflow bookkeeping that a killed driver makes necessary (the race itself: tests/test_study.py's SIGKILL)."""

from __future__ import annotations

from oodlab import stores, tags, tracking


def test_runs_of_trials_tune_lost_are_closed_as_orphans(tmp_path):
    """A trial whose run was created but that Tune's saved state never held: its run and its seed
    runs end KILLED and tagged; the trials Tune finished, and runs already ended, are left alone."""
    uri = stores.default_mlflow_uri(tmp_path)
    client = tracking._client(uri)
    exp = client.create_experiment("s")

    def run(role: str, **extra: str) -> str:
        return client.create_run(exp, tags={tags.ROLE: role, **extra}).info.run_id

    lost, lost_seed = run("trial", **{tags.TRIAL: "a"}), run("seed", **{tags.REPLICA_OF: "a", tags.SEED: "0"})
    kept, done = run("trial", **{tags.TRIAL: "b"}), run("trial", **{tags.TRIAL: "c"})
    client.set_terminated(done, status="FINISHED")
    assert tracking.reconcile_runs(uri, exp, keep={"b"}) == 1
    for rid in (lost, lost_seed):
        r = client.get_run(rid)
        assert r.info.status == "KILLED" and r.data.tags[tags.ORPHANED] == "true"
    assert client.get_run(kept).info.status == "RUNNING" and tags.ORPHANED not in client.get_run(kept).data.tags
    assert client.get_run(done).info.status == "FINISHED"
    assert tracking.reconcile_runs(uri, exp, keep={"b"}) == 0  # idempotent
