"""The result store's storage: every result and error of a namespace, one row per message, in SQLite (the default,
a file beside the cluster) or PostgreSQL (`postgresql://user@host/db`: readable from any machine), through
SQLAlchemy Core. Pure: no broker, so `splitinfer results` reads it without one.

Every message is kept (no unique key on the job id): a job answered twice would show as two rows, which is how the
tests check "answered once".
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import sqlalchemy as sa
from sqlalchemy.pool import StaticPool

METADATA = sa.MetaData()
RESULTS = sa.Table(
    "results", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("namespace", sa.Text, nullable=False),
    sa.Column("job_id", sa.Text),
    sa.Column("kind", sa.Text, nullable=False),     # 'result' or 'error'
    sa.Column("deployment", sa.Text),
    sa.Column("code", sa.Text),                     # error code (errors only)
    sa.Column("message", sa.Text),                  # error message (errors only)
    sa.Column("latency_s", sa.Double),
    sa.Column("served_by", sa.Text),                # JSON list of servers (results) or the actor that failed (errors)
    sa.Column("hops", sa.Text),                     # JSON list of hops (where the time went)
    sa.Column("outputs", sa.Text),                  # JSON {tensor: {shape, dtype}} summary
    sa.Column("body", sa.LargeBinary),              # the message exactly as received (msgpack), outputs included
    sa.Column("received_at", sa.Double, nullable=False),
    sa.Column("plan", sa.Text),                     # the plan that ran (a model deployment's plan table), else NULL
    sa.Index("results_ns_job", "namespace", "job_id"),
    sa.Index("results_ns_id", "namespace", "id"),
    sqlite_autoincrement=True,
)
COLUMNS = [c for c in RESULTS.c if c.name != "body"]


ROW_FIELDS = {"namespace", "kind", "job_id", "deployment", "code", "message", "latency_s", "served_by", "hops",
              "outputs", "body", "received_at", "plan"}


class StoreURLError(ValueError):
    """A result-store URL this build cannot open."""


def sqlite_path(url: str) -> str:
    """`sqlite:///rel/path.db`, `sqlite:////abs/path.db` (SQLAlchemy's spelling), `sqlite://` (memory) or a plain
    path."""
    if url in ("sqlite://", "sqlite:///:memory:"):
        return ":memory:"
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if not path:
            raise StoreURLError(f"result store URL {url!r} has no path")
        return path
    if "://" in url:
        raise StoreURLError(f"not a SQLite URL: {url!r}")
    return url


def engine_for(url: str) -> sa.Engine:
    """The engine of a store URL: SQLite (WAL, so a CLI reader never blocks the writer) or PostgreSQL (psycopg)."""
    scheme = url.split("://", 1)[0] if "://" in url else "sqlite"
    if scheme.startswith("postgres"):
        if scheme not in ("postgresql", "postgres", "postgresql+psycopg"):
            raise StoreURLError(f"result store URL scheme {scheme!r} is not supported (use postgresql://)")
        return sa.create_engine("postgresql+psycopg://" + url.split("://", 1)[1], pool_pre_ping=True)
    if scheme != "sqlite":
        raise StoreURLError(f"result store URL scheme {scheme!r} is not supported (use sqlite:///path.db or "
                            f"postgresql://user@host/db)")
    path = sqlite_path(url)
    if path == ":memory:":
        engine = sa.create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        path = str(Path(path).expanduser())
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 30, "check_same_thread": False})

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection, _record) -> None:
        cur = dbapi_connection.cursor()
        if path != ":memory:":
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    return engine


def _upgrade(conn: sa.Connection) -> None:
    """Stores written by earlier versions: the plan column added, the per-hop column renamed to one name."""
    columns = {c["name"] for c in sa.inspect(conn).get_columns("results")}
    if "plan" not in columns:
        conn.execute(sa.text("ALTER TABLE results ADD COLUMN plan TEXT"))
    if "timings" in columns:
        conn.execute(sa.text("ALTER TABLE results RENAME COLUMN timings TO hops"))


@dataclass
class StoredRow:
    id: int
    namespace: str
    job_id: str | None
    kind: str
    deployment: str | None
    code: str | None
    message: str | None
    latency_s: float | None
    served_by: Any
    hops: list
    outputs: dict
    received_at: float
    plan: str | None = None

    def to_json(self) -> dict:
        return {
            "id": self.id, "namespace": self.namespace, "job_id": self.job_id, "kind": self.kind,
            "deployment": self.deployment, "plan": self.plan, "code": self.code, "message": self.message,
            "latency_s": self.latency_s, "served_by": self.served_by, "hops": self.hops,
            "outputs": self.outputs, "received_at": self.received_at,
        }


class ResultStore:
    """Thread-safe (the engine's connection pool); the schema is created on open."""

    def __init__(self, url: str):
        self.url = url
        self.engine = engine_for(url)
        try:
            with self.engine.begin() as conn:
                METADATA.create_all(conn)
                _upgrade(conn)
        except sa.exc.OperationalError as exc:
            self.engine.dispose()
            raise StoreURLError(f"cannot open the result store: {str(exc.orig).strip().splitlines()[0]}") from None

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, namespace: str, kind: str, job_id: str | None, **fields: Any) -> int:
        """One row; the id it got. Fields: deployment, code, message, latency_s, served_by, hops, outputs, body,
        received_at, plan."""
        return self.add_many([dict(namespace=namespace, kind=kind, job_id=job_id, **fields)])[0]

    def add_many(self, rows: list[dict]) -> list[int]:
        """Rows in one transaction (a busy store commits once per batch, not per row); their ids."""
        values = []
        for r in rows:
            if r["kind"] not in ("result", "error"):
                raise ValueError(f"kind must be 'result' or 'error', not {r['kind']!r}")
            unknown = set(r) - ROW_FIELDS
            if unknown:
                raise TypeError(f"unknown result store fields {sorted(unknown)}")
            values.append(dict(
                namespace=r["namespace"], job_id=r.get("job_id"), kind=r["kind"], deployment=r.get("deployment"),
                code=r.get("code"), message=r.get("message"), latency_s=r.get("latency_s"),
                served_by=json.dumps(r.get("served_by")), hops=json.dumps(r.get("hops") or []),
                outputs=json.dumps(r.get("outputs") or {}), body=r.get("body"),
                received_at=time.time() if r.get("received_at") is None else r["received_at"], plan=r.get("plan")))
        with self.engine.begin() as conn:
            result = conn.execute(RESULTS.insert().returning(RESULTS.c.id, sort_by_parameter_order=True), values)
            return [int(row[0]) for row in result]

    def query(
        self,
        namespace: str | None = None,
        *,
        job_id: str | None = None,
        kind: str | None = None,
        deployment: str | None = None,
        after_id: int = 0,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[StoredRow]:
        q = sa.select(*COLUMNS).where(RESULTS.c.id > after_id)
        for column, value in (("namespace", namespace), ("job_id", job_id), ("kind", kind),
                              ("deployment", deployment)):
            if value is not None:
                q = q.where(RESULTS.c[column] == value)
        q = q.order_by(RESULTS.c.id.desc() if newest_first else RESULTS.c.id.asc())
        if limit is not None:
            q = q.limit(int(limit))
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        return [
            StoredRow(r.id, r.namespace, r.job_id, r.kind, r.deployment, r.code, r.message, r.latency_s,
                      json.loads(r.served_by or "null"), json.loads(r.hops or "[]"), json.loads(r.outputs or "{}"),
                      r.received_at, r.plan)
            for r in rows
        ]

    def body(self, row_id: int) -> bytes | None:
        with self.engine.connect() as conn:
            body = conn.execute(sa.select(RESULTS.c.body).where(RESULTS.c.id == row_id)).scalar()
        return None if body is None else bytes(body)

    def count(self, namespace: str | None = None, kind: str | None = None) -> int:
        q = sa.select(sa.func.count()).select_from(RESULTS)
        if namespace is not None:
            q = q.where(RESULTS.c.namespace == namespace)
        if kind is not None:
            q = q.where(RESULTS.c.kind == kind)
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def follow(self, namespace: str | None = None, after_id: int = 0, poll_s: float = 0.5,
               stop: threading.Event | None = None) -> Iterator[StoredRow]:
        """Yield rows as they are written (polling), until `stop` is set."""
        last = after_id
        while stop is None or not stop.is_set():
            rows = self.query(namespace, after_id=last)
            for row in rows:
                last = row.id
                yield row
            if not rows:
                time.sleep(poll_s)
