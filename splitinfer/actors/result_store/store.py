"""The result store's storage: every result and error of a namespace, one row per message, in SQLite (the URL
setting). Pure: sqlite3, no broker, so `splitinfer results` reads it without one.

Every message is kept (no unique key on the job id): a job answered twice would show as two rows, which is how the
tests check "answered once".
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL,
    job_id TEXT,
    kind TEXT NOT NULL,              -- 'result' or 'error'
    deployment TEXT,
    code TEXT,                       -- error code (errors only)
    message TEXT,                    -- error message (errors only)
    latency_s REAL,
    served_by TEXT,                  -- JSON list of servers (results) or the actor that failed (errors)
    hops TEXT,                       -- JSON list of hops (where the time went)
    outputs TEXT,                    -- JSON {tensor: {shape, dtype}} summary
    body BLOB,                       -- the message exactly as received (msgpack), outputs included
    received_at REAL NOT NULL,
    plan TEXT                        -- the plan that ran (a model deployment's plan table), else NULL
);
CREATE INDEX IF NOT EXISTS results_ns_job ON results (namespace, job_id);
CREATE INDEX IF NOT EXISTS results_ns_id ON results (namespace, id);
"""


ROW_FIELDS = {"namespace", "kind", "job_id", "deployment", "code", "message", "latency_s", "served_by", "hops",
              "outputs", "body", "received_at", "plan"}


class StoreURLError(ValueError):
    """A result-store URL this build cannot open."""


def sqlite_path(url: str) -> str:
    """`sqlite:///rel/path.db`, `sqlite:////abs/path.db` (SQLAlchemy's spelling), `sqlite://` (memory) or a plain
    path. PostgreSQL is a future backend: its URL is refused with a clear message rather than misread as a path."""
    if url in ("sqlite://", "sqlite:///:memory:"):
        return ":memory:"
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if not path:
            raise StoreURLError(f"result store URL {url!r} has no path")
        return path
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise StoreURLError(f"result store URL scheme {scheme!r} is not supported (use sqlite:///path.db)")
    return url


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
    """Thread-safe (one connection, one lock); WAL so a CLI reader never blocks the writer."""

    def __init__(self, url: str):
        self.url = url
        path = sqlite_path(url)
        if path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            path = str(Path(path).expanduser())
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, timeout=30)
        if path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(results)")}
        if "plan" not in columns:  # a store written before plan tables existed
            self._db.execute("ALTER TABLE results ADD COLUMN plan TEXT")
        if "timings" in columns:  # a store written before the per-hop field had one name everywhere
            self._db.execute("ALTER TABLE results RENAME COLUMN timings TO hops")
        self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()

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
            values.append((
                r["namespace"], r.get("job_id"), r["kind"], r.get("deployment"), r.get("code"), r.get("message"),
                r.get("latency_s"), json.dumps(r.get("served_by")), json.dumps(r.get("hops") or []),
                json.dumps(r.get("outputs") or {}), r.get("body"),
                time.time() if r.get("received_at") is None else r["received_at"], r.get("plan")))
        ids = []
        with self._lock:
            for v in values:
                cur = self._db.execute(
                    "INSERT INTO results (namespace, job_id, kind, deployment, code, message, latency_s, served_by,"
                    " hops, outputs, body, received_at, plan) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", v)
                ids.append(int(cur.lastrowid))
            self._db.commit()
        return ids

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
        where, args = ["id > ?"], [after_id]
        for column, value in (("namespace", namespace), ("job_id", job_id), ("kind", kind),
                              ("deployment", deployment)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = (
            "SELECT id, namespace, job_id, kind, deployment, code, message, latency_s, served_by, hops, outputs,"
            f" received_at, plan FROM results WHERE {' AND '.join(where)} ORDER BY id {'DESC' if newest_first else 'ASC'}"
        )
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [
            StoredRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], json.loads(r[8] or "null"),
                      json.loads(r[9] or "[]"), json.loads(r[10] or "{}"), r[11], r[12])
            for r in rows
        ]

    def body(self, row_id: int) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT body FROM results WHERE id = ?", (row_id,)).fetchone()
        return None if row is None else row[0]

    def count(self, namespace: str | None = None, kind: str | None = None) -> int:
        where, args = ["1=1"], []
        if namespace is not None:
            where.append("namespace = ?")
            args.append(namespace)
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        with self._lock:
            return int(self._db.execute(f"SELECT COUNT(*) FROM results WHERE {' AND '.join(where)}", args).fetchone()[0])

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
