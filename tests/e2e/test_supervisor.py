"""The supervisor with real processes: crash -> restart with bounded backoff -> give up; clean stop of every child;
and `splitinfer up` starting (and stopping) a private RabbitMQ node when no broker answers."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys

import pytest

psutil = pytest.importorskip("psutil")

from splitinfer.actors.supervisor import broker as broker_mod  # noqa: E402
from splitinfer.actors.supervisor import supervisor as sup_mod  # noqa: E402
from splitinfer.actors.transport.retry import Backoff  # noqa: E402
from splitinfer.actors.supervisor import Supervisor, broker_answers
from splitinfer.actors.supervisor.broker import has_hash_exchange
from splitinfer.config import ClusterConfig  # noqa: E402
from splitinfer.config import Settings  # noqa: E402
from tests.support.broker import requires_broker  # noqa: E402
from tests.support.waiting import eventually, eventually_sync  # noqa: E402

PY = sys.executable


def free_port(low: int = 50000, high: int = 60000) -> int:
    """A free port above 45535 on purpose: there RabbitMQ's default distribution port (port + 20000) is invalid."""
    import random

    for _ in range(200):
        port = random.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


@requires_broker
def test_crashed_actor_is_restarted_with_backoff_then_given_up_and_stop_ends_every_child(
        monkeypatch, tmp_path, namespace):
    # stand-in actors: one that always crashes, one that runs until SIGTERM
    crasher = [PY, "-c", "import sys; sys.exit(3)"]
    sleeper = [PY, "-c", "import signal, sys, time\n"
                         "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
                         "time.sleep(600)"]
    monkeypatch.setattr(sup_mod, "plan_actors", lambda cfg: [("crasher", crasher), ("sleeper", sleeper)])
    monkeypatch.setattr(sup_mod, "RESTART", Backoff(attempts=4, first_s=0.05, max_s=0.2))  # gives up at the 4th
    said: list[str] = []
    settings = Settings(namespace=namespace, cache_dir=tmp_path)

    async def go():
        sup = Supervisor(ClusterConfig(), settings=settings, say=said.append, run_dir=tmp_path / "run")
        await sup.start()
        crash = sup.actors["crasher"]
        try:
            await eventually(lambda: crash.gave_up, timeout=20, interval=0.05, message="the supervisor gives up")
        except AssertionError:
            await sup.stop()  # no child left behind
            raise
        sleeper_pid = sup.actors["sleeper"].pid
        status = sup.status()
        await sup.stop()
        return crash, sleeper_pid, status, sup.actors["sleeper"].proc.returncode

    crash, sleeper_pid, status, sleeper_rc = asyncio.run(go())
    assert crash.gave_up and crash.restarts == 3 and [code for _, code in crash.history] == [3, 3, 3, 3]
    gaps = [b - a for (a, _), (b, _) in zip(crash.history, crash.history[1:])]
    assert all(g >= 0.04 for g in gaps), gaps  # it waited before each restart
    assert any("restarting in 0.1s" in m for m in said) and any("giving up" in m for m in said)
    assert {s["name"]: s["running"] for s in status} == {"crasher": False, "sleeper": True}
    assert sleeper_rc == 0 and not psutil.pid_exists(sleeper_pid)
    assert said[-1] == "all stopped"


@pytest.mark.skipif(broker_mod._rabbit_bin("rabbitmq-server") is None, reason="rabbitmq-server not installed")
def test_up_starts_a_private_broker_when_none_answers_and_stops_it(tmp_path, namespace):
    port = free_port()
    url = f"amqp://guest:guest@localhost:{port}/"
    assert not broker_answers(url, timeout=1)
    cfg = tmp_path / "cluster.toml"
    cfg.write_text(f'broker_url = "{url}"\nprivate_broker = true\nprivate_broker_port = {port}\nfront_end = false\n'
                   f'result_store = false\n')
    env = {**os.environ, "SPLITINFER_NAMESPACE": namespace, "SPLITINFER_CACHE_DIR": str(tmp_path / "cache"),
           "COLUMNS": "300"}
    out = tmp_path / "up.log"
    with open(out, "wb") as log:
        up = subprocess.Popen([PY, "-m", "splitinfer.cli", "up", "--config", str(cfg)], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # up, with its private broker and actors, says so (or exits early: the asserts below say why)
        eventually_sync(lambda: "press Ctrl-C" in out.read_text() or up.poll() is not None, timeout=120, interval=0.3,
                        message=lambda: f"`splitinfer up` ready:\n{out.read_text()[-2000:]}")
        text = out.read_text()
        assert "starting a private RabbitMQ node" in text and f"port {port}" in text, text
        assert broker_answers(url) and has_hash_exchange(url)
        kids = psutil.Process(up.pid).children(recursive=True)
        cmdlines = [" ".join(k.cmdline()) for k in kids]
        assert any("splitinfer.actors.registry" in c for c in cmdlines)
        assert any("splitinfer.actors.model_pool" in c for c in cmdlines)
    finally:
        up.send_signal(signal.SIGINT)  # what Ctrl-C sends
        rc = up.wait(timeout=120)
    text = out.read_text()
    assert rc == 0, text
    assert "private broker" in text and "stopped" in text and "all stopped" in text
    assert not broker_answers(url, timeout=1)
    assert not [k for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]


def test_up_without_a_broker_is_an_error_unless_a_private_one_is_asked_for(tmp_path, namespace):
    from tests.support.cli import assert_one_line_error, cli

    url = f"amqp://guest:guest@localhost:{free_port()}/"
    env = {**os.environ, "SPLITINFER_NAMESPACE": namespace, "SPLITINFER_CACHE_DIR": str(tmp_path / "cache")}
    for args in (("up", "--broker-url", url), ("server", "--name", "e1", "--broker", url)):
        proc = cli(*args, env=env, timeout=120)
        assert_one_line_error(proc, "no broker answers", "--private-broker")
    assert not broker_answers(url, timeout=1)  # nothing was started behind the user's back
