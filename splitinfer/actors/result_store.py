"""Result store: every result and error published to `<ns>.results`, kept in SQLite (URL setting) and queryable.

Storage (`ResultStore`) is plain sqlite3 and imports no broker code, so `splitinfer results` reads it without a
broker. The actor (`ResultStoreActor`, run with `python -m splitinfer.actors.result_store`) binds its own queue to
`<ns>.results` with `#`, writes each message and acks it only after the row is committed.

Every message is kept, one row per message (no unique key on the job id): a job answered twice would show as two
rows, which is how the tests check "answered once".
"""

from __future__ import annotations

import functools
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
    timings TEXT,                    -- JSON list of hops
    outputs TEXT,                    -- JSON {tensor: {shape, dtype}} summary
    body BLOB,                       -- the message exactly as received (msgpack), outputs included
    received_at REAL NOT NULL,
    plan TEXT                        -- the plan that ran (a model deployment's plan table), else NULL
);
CREATE INDEX IF NOT EXISTS results_ns_job ON results (namespace, job_id);
CREATE INDEX IF NOT EXISTS results_ns_id ON results (namespace, id);
"""


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
    timings: list
    outputs: dict
    received_at: float
    plan: str | None = None

    def to_json(self) -> dict:
        return {
            "id": self.id, "namespace": self.namespace, "job_id": self.job_id, "kind": self.kind,
            "deployment": self.deployment, "plan": self.plan, "code": self.code, "message": self.message,
            "latency_s": self.latency_s, "served_by": self.served_by, "timings": self.timings,
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
        self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(
        self,
        namespace: str,
        kind: str,
        job_id: str | None,
        *,
        deployment: str | None = None,
        code: str | None = None,
        message: str | None = None,
        latency_s: float | None = None,
        served_by: Any = None,
        timings: list | None = None,
        outputs: dict | None = None,
        body: bytes | None = None,
        received_at: float | None = None,
        plan: str | None = None,
    ) -> int:
        if kind not in ("result", "error"):
            raise ValueError(f"kind must be 'result' or 'error', not {kind!r}")
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO results (namespace, job_id, kind, deployment, code, message, latency_s, served_by,"
                " timings, outputs, body, received_at, plan) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    namespace, job_id, kind, deployment, code, message, latency_s,
                    json.dumps(served_by), json.dumps(timings or []), json.dumps(outputs or {}),
                    body, time.time() if received_at is None else received_at, plan,
                ),
            )
            self._db.commit()
            return int(cur.lastrowid)

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
            "SELECT id, namespace, job_id, kind, deployment, code, message, latency_s, served_by, timings, outputs,"
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


# --------------------------------------------------------------------------------------------------- the actor

def _summary(outputs: dict) -> dict:
    return {name: {"shape": list(arr.shape), "dtype": arr.dtype.str} for name, arr in outputs.items()}


@functools.lru_cache(maxsize=1)
def _actor_class():
    """The actor class, built lazily so importing this module (for `splitinfer results`) needs no broker code."""
    from splitinfer.actors.base import Actor
    from splitinfer.actors.front_end import INTERNAL_PREFIX
    from splitinfer.actors.topology import escape_key
    from splitinfer.messages import ErrorResult, MessageError, ResultMessage

    internal_key_prefix = escape_key(INTERNAL_PREFIX)

    class ResultStoreActor(Actor):
        kind = "result_store"

        def __init__(self, actor_id: str = "result_store", settings=None, url: str | None = None):
            super().__init__(actor_id, settings)
            self.store = ResultStore(url or self.settings.results_url())

        @property
        def queue_name(self) -> str:
            return f"{self.names.ns}.result_store"

        async def setup(self) -> None:
            from splitinfer.actors.topology import queue_arguments

            assert self.channel is not None
            queue = await self.channel.declare_queue(
                self.queue_name, durable=True,
                arguments=queue_arguments(self.names, expires_s=self.settings.queue_expires_s))
            await queue.bind(self.exchanges["results"], routing_key="#")
            await self.consume(queue, self.on_message)
            self.log("storing", url=self.store.url, queue=self.queue_name)

        async def on_message(self, message) -> None:
            if (message.routing_key or "").startswith(internal_key_prefix):
                # a model server's error about a front end's request: the front end answers the job with it
                await self.ack(message)
                return
            try:
                msg = self.decode(message, expect=(ResultMessage, ErrorResult))
            except MessageError as exc:
                # not something we can store as a result: keep the fact, dead-letter the bytes (no error result:
                # answering a broken answer on the results exchange would loop)
                job_id, reason = exc.job_id, exc.reason
                await self.run_in_worker(lambda: self.store.add(
                    self.names.ns, "error", job_id, code="undecodable_result", message=reason,
                    served_by=message.routing_key))
                self.stats["errors"] += 1
                await self.nack(message, requeue=False)
                return
            body = bytes(message.body)
            if isinstance(msg, ResultMessage):
                row = dict(kind="result", deployment=msg.deployment, latency_s=msg.latency_s, served_by=msg.served_by,
                           timings=[h.model_dump() for h in msg.hops], outputs=_summary(msg.outputs), plan=msg.plan)
            else:
                row = dict(kind="error", deployment=msg.deployment, code=msg.code, message=msg.message,
                           served_by=msg.where, plan=msg.plan)
            kind = row.pop("kind")
            await self.run_in_worker(lambda: self.store.add(self.names.ns, kind, msg.job_id, body=body, **row))
            self.stats["processed"] += 1
            await self.ack(message)

    return ResultStoreActor


def __getattr__(name: str):
    if name == "ResultStoreActor":
        return _actor_class()
    raise AttributeError(name)


def main(argv: list[str] | None = None) -> None:
    """`python -m splitinfer.actors.result_store [--id ID] [--url sqlite:///path.db]`"""
    import argparse

    from splitinfer.actors.base import run_actor

    parser = argparse.ArgumentParser(prog="python -m splitinfer.actors.result_store")
    parser.add_argument("--id", default="result_store")
    parser.add_argument("--url", default=None, help="result store URL (default: settings.result_store_url)")
    args = parser.parse_args(argv)
    run_actor(_actor_class()(args.id, url=args.url))


if __name__ == "__main__":
    main()
