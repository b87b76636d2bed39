"""The result store, the same tests on SQLite and on a real PostgreSQL server (a scratch database of the test's
own): URLs, every row kept, queries by namespace, job and kind, a second handle following what the writer
commits."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from splitinfer.actors.result_store.store import ResultStore, StoreURLError, sqlite_path
from splitinfer.config import Settings
from tests.support.postgres import requires_postgres, scratch_database


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=requires_postgres)])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'r.db'}"
    else:
        with scratch_database("store") as url:
            yield url


def test_store_urls():
    assert sqlite_path("sqlite:////tmp/x.db") == "/tmp/x.db"
    assert sqlite_path("sqlite:///rel/x.db") == "rel/x.db"
    assert sqlite_path("sqlite://") == ":memory:"
    assert sqlite_path("/plain/path.db") == "/plain/path.db"
    with pytest.raises(StoreURLError, match="not a SQLite URL"):
        sqlite_path("postgresql://host/db")
    with pytest.raises(StoreURLError, match="'mysql' is not supported"):
        ResultStore("mysql://host/db")
    assert Settings(cache_dir=Path("/c")).results_url() == "sqlite:////c/results.db"


def test_store_keeps_every_row_and_queries_by_namespace_job_and_kind(store_url):
    url = store_url
    with ResultStore(url) as db:
        a = db.add("ns1", "result", "j1", deployment="d", latency_s=0.1, served_by=["s1"],
                   hops=[{"part": "part0", "server": "s1", "compute_s": 0.01}],
                   outputs={"o:0": {"shape": [1, 3], "dtype": "<f4"}}, body=b"\x01\x02")
        db.add("ns1", "error", "j2", code="wrong_shape", message="bad")
        db.add("ns1", "result", "j1")  # a duplicate answer is kept, so it can be seen
        db.add("ns2", "result", "j9")
        with pytest.raises(ValueError):
            db.add("ns1", "maybe", "j3")
        assert db.count("ns1") == 3 and db.count() == 4 and db.count("ns1", kind="error") == 1
        assert [r.job_id for r in db.query("ns1", job_id="j1")] == ["j1", "j1"]
        assert [r.code for r in db.query("ns1", kind="error")] == ["wrong_shape"]
        newest = db.query("ns1", limit=1, newest_first=True)[0]
        assert newest.job_id == "j1" and newest.id > a
        first = db.query("ns1")[0]
        assert first.hops[0]["compute_s"] == 0.01 and first.served_by == ["s1"] and db.body(a) == b"\x01\x02"
        assert db.query("ns1", after_id=newest.id) == []
    # a second handle (the CLI) reads what the writer committed, and follow() yields new rows
    with ResultStore(url) as writer, ResultStore(url) as reader:
        stop = threading.Event()
        got = []

        def follow():
            for row in reader.follow("ns1", after_id=newest.id, poll_s=0.05, stop=stop):
                got.append(row.job_id)
                stop.set()

        th = threading.Thread(target=follow)
        th.start()
        writer.add("ns1", "result", "j5")
        th.join(10)
        assert got == ["j5"]


@requires_postgres
def test_a_postgresql_server_that_refuses_is_one_clear_error():
    from tests.support.postgres import POSTGRES_ADMIN_URL

    with pytest.raises(StoreURLError, match="cannot open the result store") as err:
        ResultStore(POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/no_such_database_here")
    assert "\n" not in str(err.value)
