"""Where a study's results live: the Optuna storage URL, the MLflow tracking URI, and whether a
checkpoint location is shared by every node of a cluster.

Why one module: every entry point (study runner, ``oodlab list/report/ui/export``) must agree on
the defaults under ``--storage DIR`` and accept the same durable stores instead:

- ``--optuna-storage URL``: any Optuna RDB URL (``sqlite:///…``, ``postgresql://…``,
  ``mysql+pymysql://…``) or ``journal:///abs/path/file.log`` (Optuna's journal file storage,
  safe on NFS where sqlite's locking is not); default ``sqlite:///DIR/optuna.db``.
- ``--mlflow-uri URI``: a database URI (``sqlite:///…``, ``postgresql://…``) or a tracking server
  (``http://…``); default ``sqlite:///DIR/mlflow.db`` with artifacts in ``DIR/mlartifacts``.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

JOURNAL_SCHEME = "journal://"
RDB_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")
# Filesystems every node of a cluster can mount; anything else under a plain path is one machine's disk.
# $OODLAB_SHARED_FS_TYPES (comma-separated) adds types, for a shared filesystem missing here.
NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "glusterfs", "ceph", "beegfs", "9p",
              "efs", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "fuse.mountpoint-s3", "fuse.glusterfs",
              "fuse.ceph", "fuse.sshfs", "fuse.rclone", "fuse.goofys", "fuse.blobfuse", "fuse.blobfuse2"}


class StoreError(ValueError):
    """A storage URL that no store understands."""


def default_optuna_url(results: Path) -> str:
    return f"sqlite:///{results.resolve() / 'optuna.db'}"


def default_mlflow_uri(results: Path) -> str:
    return f"sqlite:///{results.resolve() / 'mlflow.db'}"


def optuna_url(arg: str | None, results: Path) -> str:
    """The Optuna storage a study uses: ``--optuna-storage`` (checked) or the default under ``results``."""
    if not arg:
        return default_optuna_url(results)
    scheme = arg.split("://", 1)[0].split("+", 1)[0] if "://" in arg else ""
    if arg.startswith(JOURNAL_SCHEME):
        if not Path(journal_path(arg)).is_absolute():
            raise StoreError(f"--optuna-storage {arg}: a journal file needs an absolute path (journal:///abs/file.log)")
        return arg
    if scheme not in RDB_SCHEMES:
        raise StoreError(f"--optuna-storage {arg}: expected sqlite:///…, postgresql://…, mysql://… "
                         "or journal:///abs/path/file.log")
    return hide_password(arg)


def hide_password(url: str) -> str:
    """A PostgreSQL URL with a password: the password moves to a private libpq password file
    (``$PGPASSFILE``, mode 0600, in this process's temp dir, the user's own ``~/.pgpass`` lines
    after it) and the URL without it is returned. Why: Optuna's storage object, Tune's pickled
    experiment state (``tuner.pkl``, searcher state) and MLflow callbacks keep the URL they are
    given, and they are written next to the checkpoints (S3, NFS). Other URLs are returned as given.
    """
    if url.split("://", 1)[0].split("+", 1)[0] != "postgresql" or strip_password(url) == url:
        return url
    from sqlalchemy.engine import make_url

    u = make_url(url)
    esc = lambda v: str(v).replace("\\", "\\\\").replace(":", "\\:")
    line = ":".join(esc(v) for v in (u.host or "*", u.port or "*", u.database or "*", u.username or "*", u.password))
    global _PASSFILE
    if _PASSFILE is None:
        own = os.environ.get("PGPASSFILE") or str(Path.home() / ".pgpass")
        folder = tempfile.mkdtemp(prefix="oodlab-pg-")
        atexit.register(shutil.rmtree, folder, True)
        _PASSFILE = Path(folder) / "pgpass"
        _PASSFILE.touch(mode=0o600)
        if Path(own).is_file():
            _PASSFILE.write_text(Path(own).read_text())
        os.environ["PGPASSFILE"] = str(_PASSFILE)
    _PASSFILE.write_text(line + "\n" + _PASSFILE.read_text())  # first match wins in libpq
    return strip_password(url)


_PASSFILE: Path | None = None


def journal_path(url: str) -> str:
    return url.removeprefix(JOURNAL_SCHEME)


def optuna_storage(url: str) -> Any:
    """An Optuna storage object for a URL from ``optuna_url`` (journal file or RDB)."""
    import optuna

    if url.startswith(JOURNAL_SCHEME):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(journal_path(url))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))


def _engine_kwargs(url: str) -> dict[str, Any]:
    # Long studies: a server may drop idle connections between trials; ping before use.
    return {} if url.startswith("sqlite") else {"pool_pre_ping": True}


def check_reachable(url: str) -> None:
    """Fail fast (before any compute) when a database server in ``url`` cannot be reached; writes nothing."""
    if is_local_file_store(url) or url.split("://", 1)[0].split("+", 1)[0] not in RDB_SCHEMES:
        return  # files are created by the study; tracking servers are checked by tracking.check_reachable
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url, connect_args=_connect_timeout(url))
        with engine.connect():
            pass
        engine.dispose()
    except Exception as e:  # noqa: BLE001 - any failure means "cannot use this store"
        raise StoreError(f"cannot reach the database at {redact(url)}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300]}") from None


def _connect_timeout(url: str) -> dict[str, Any]:
    return {"connect_timeout": 10} if url.startswith(("postgresql", "mysql")) else {}


def redact(url: str) -> str:
    """``url`` with its password shown as ``***`` (errors are printed and logged)."""
    return _without_password(url, "***")


def strip_password(url: str) -> str:
    """``url`` with no password at all: what a study may write down (``remember``). libpq finds the
    password again in ``~/.pgpass`` or ``$PGPASSWORD``; MySQL and servers need it given again."""
    return _without_password(url, None)


def _without_password(url: str, mask: str | None) -> str:
    """Database URLs through SQLAlchemy's own URL parser (``render_as_string(hide_password=…)``);
    a tracking server's ``http(s)://user:pw@host`` by hand: SQLAlchemy parses only database URLs
    and its ``hide_password`` has no way to drop the password instead of masking it."""
    head, sep, rest = url.partition("://")
    if "@" not in rest.split("/", 1)[0] and "@" not in rest.rpartition("@")[0]:
        return url
    if head.split("+", 1)[0] in RDB_SCHEMES:
        from sqlalchemy.engine import URL, make_url
        from sqlalchemy.exc import ArgumentError

        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError):
            pass
        else:
            if parsed.password is None:
                return url
            if mask is None:
                bare = URL.create(parsed.drivername, parsed.username, None, parsed.host, parsed.port,
                                  parsed.database, parsed.query)
                return bare.render_as_string(hide_password=False)
            return parsed.render_as_string(hide_password=True)
    cred, _, host = rest.rpartition("@")
    if ":" not in cred:
        return url
    user = cred.split(":", 1)[0]
    return f"{head}{sep}{user}{':' + mask if mask else ''}@{host}"


# ---------------------------------------------------------------- a study's stores, remembered

REMEMBERED = "stores.json"


def remember(results: Path, study: str, optuna: str, mlflow: str, checkpoints: str) -> None:
    """Write down in ``results/stores.json`` which stores ``study`` uses (never a password), so
    ``oodlab list/report/export/ui --storage results`` find them without the study's flags."""
    path = results / REMEMBERED
    with creation_lock(f"sqlite:///{path}"):  # studies sharing a results folder write it in turn
        known = remembered(results)
        known[study] = {"optuna_storage": strip_password(optuna), "mlflow_uri": strip_password(mlflow),
                        "checkpoint_storage": strip_password(checkpoints)}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)


def remembered(results: Path) -> dict[str, dict[str, str]]:
    """``{study: {"optuna_storage", "mlflow_uri", "checkpoint_storage"}}`` from ``results/stores.json``."""
    try:
        data = json.loads((results / REMEMBERED).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def study_exists(storage: Any, name: str) -> bool:
    import optuna

    return name in {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}


@contextlib.contextmanager
def creation_lock(uri: str) -> Iterator[None]:
    """Serialise creating (and migrating) a store across processes on this machine.

    Two drivers that open a fresh sqlite ``mlflow.db`` (or database) at once race in its alembic
    migration and one dies; under this lock the second one finds the schema complete. sqlite:
    a lock file beside the database; servers: a lock file per URL in the temp dir.
    """
    if uri.startswith("sqlite:///"):
        lock = Path(uri.removeprefix("sqlite:///") + ".lock")
    elif uri.startswith(JOURNAL_SCHEME):
        yield  # the journal backend locks its own file
        return
    else:
        digest = hashlib.sha1(uri.encode()).hexdigest()[:16]
        lock = Path(tempfile.gettempdir()) / f"oodlab-store-{digest}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_local_file_store(uri: str) -> bool:
    """True for stores that are files under ``--storage`` (sqlite): what a study may create itself."""
    return uri.startswith("sqlite:") or uri.startswith(JOURNAL_SCHEME)


def fs_type(path: str) -> str:
    """Filesystem type of the mount holding ``path`` (from /proc/mounts), or 'unknown'."""
    if "://" in path and not path.startswith("file://"):
        return path.split("://", 1)[0]
    p = Path(path.removeprefix("file://")).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (str(p) == point or str(p).startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def is_shared(path: str) -> bool:
    """Whether every node of a cluster can reach ``path``: a cloud URI (s3://, gs://, …) or a network mount."""
    if "://" in path and not path.startswith("file://"):
        return True
    extra = {t.strip() for t in os.environ.get("OODLAB_SHARED_FS_TYPES", "").split(",") if t.strip()}
    return fs_type(path) in NETWORK_FS | extra
