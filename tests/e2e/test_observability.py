"""Every actor of `splitinfer up` serves /metrics, /healthz and /readyz on a port of its own (cluster.toml's
metrics_port, +1 per process): scraped during inference, the servers' per-part request counts and histogram
buckets are non-zero and the front end counts its jobs and answers; a server restarted after kill -9 is not ready
until it has loaded its parts again, then is, and answers."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request

import numpy as np
import psutil
from prometheus_client.parser import text_string_to_metric_families

from splitinfer.client import Client
from splitinfer.messages import ResultMessage
from splitinfer.splitter.manifest import Manifest
from tests.support.actors import dag_reference, log_events
from tests.support.broker import requires_broker
from tests.support.cli import cli
from tests.support.up_cluster import up_cluster
from tests.support.waiting import eventually, eventually_sync

pytestmark = requires_broker

TOL = 1e-5


def _free_base(span: int = 10) -> int:
    """A run of `span` free ports (one per actor process)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + span > 65000:
            continue
        try:
            socks = []
            for k in range(span):
                sk = socket.socket()
                socks.append(sk)
                sk.bind(("127.0.0.1", base + k))
            return base
        except OSError:
            continue
        finally:
            for sk in socks:
                sk.close()
    raise RuntimeError("no run of free ports")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _samples(text: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def test_metrics_health_and_readiness_of_a_running_cluster(tmp_path, run_prefix, dag_split):
    base = _free_base()
    config = f'metrics_port = {base}\n[[servers]]\nid = "s1"\n\n[[servers]]\nid = "s2"\n'
    out = Manifest.load(dag_split).output_names[0]
    xs, ref = dag_reference(dag_split, 8, seed=41)
    with up_cluster(tmp_path, run_prefix, config, tag="metrics") as cl:
        logs = cl.root / "cache" / "run" / cl.ns / "logs"

        def url_of(actor: str) -> str:
            urls = [e["url"] for e in log_events(logs / f"{actor}.log") if e.get("event") == "serving_metrics"]
            assert urls, f"{actor} serves no metrics yet"
            return urls[-1].rsplit("/", 1)[0]

        async def deploy_and_infer():
            async with Client(cl.settings) as c:
                dep = await c.deploy(dag_split, min_servers=2, timeout=300)
                return dep, [await c.infer(dep.deployment, xs[k:k + 1], deadline_s=60) for k in range(6)]

        dep, answers = asyncio.run(deploy_and_infer())
        for k, a in enumerate(answers):
            assert isinstance(a, ResultMessage) and float(np.max(np.abs(a.outputs[out] - ref[k:k + 1]))) <= TOL
        servers = {s: url_of(f"server-{s}") for s in ("s1", "s2")}
        assert len({*servers.values(), url_of("front_end"), url_of("registry")}) == 4  # a port per process
        computed = 0
        for s, url in servers.items():
            assert _get(f"{url}/healthz")[0] == 200 and _get(f"{url}/readyz") == (200, "ready\n")
            samples = _samples(_get(f"{url}/metrics")[1])
            requests = {x.labels["part"]: x.value for x in samples if x.name == "splitinfer_part_requests_total"
                        and x.labels["deployment"] == dep.deployment}
            assert requests and all(v >= 6 for v in requests.values()), (s, requests)  # every job crossed each part
            computed += sum(requests.values())
            inf = [x.value for x in samples if x.name == "splitinfer_part_compute_seconds_bucket"
                   and x.labels["le"] == "+Inf"]
            assert inf and all(v >= 1 for v in inf), (s, inf)
            assert any(x.name == "splitinfer_part_batch_size_count" and x.value >= 1 for x in samples)
            assert any(x.name == "splitinfer_broker_connected" and x.value == 1 for x in samples)
        assert computed >= 6 * len(Manifest.load(dag_split).parts)
        front = _samples(_get(f"{url_of('front_end')}/metrics")[1])
        assert next(x.value for x in front if x.name == "splitinfer_jobs_total") >= 6
        assert next(x.value for x in front if x.name == "splitinfer_answers_total" and x.labels["code"] == "ok") >= 6
        assert _get(f"{servers['s1']}/nowhere")[0] == 404
        # `splitinfer status` shows where each actor's metrics are and whether it is ready (from its heartbeats)
        shown = cli("status", "--json", env=cl.env)
        assert shown.returncode == 0, shown.stderr
        states = {a["actor_id"]: a["state"] for a in json.loads(shown.stdout)["actors"]}
        for s, url in servers.items():
            assert states[s]["metrics_url"] == f"{url}/metrics" and states[s]["not_ready"] is None, states[s]

        # kill -9 s1: restarted on the same port, it is not ready until its parts are loaded again
        [victim] = [p for p in psutil.Process(cl.up.pid).children(recursive=True)
                    if "splitinfer.actors.model_server" in " ".join(p.cmdline()) and "s1" in p.cmdline()]
        victim.kill()
        victim.wait(timeout=30)
        seen: list[tuple[int, str]] = []

        def ready_again() -> bool:
            try:
                seen.append(_get(f"{servers['s1']}/readyz"))
            except OSError:  # not listening yet
                return False
            return seen[-1][0] == 200

        eventually_sync(ready_again, timeout=120, interval=0.02, message=lambda: f"s1 ready again: {seen[-3:]}")
        not_ready = [body for code, body in seen if code == 503]
        assert not_ready and all(b.startswith(("starting", "loading")) for b in not_ready), seen

        async def after():
            async with Client(cl.settings) as c:
                async def hosted() -> bool:
                    return any(a.actor_id == "s1" and a.alive and a.parts for a in await c.servers())

                await eventually(hosted, timeout=60, interval=0.2, message="s1 registered with its parts")
                return await c.infer(dep.deployment, xs[7:8], deadline_s=60)

        last = asyncio.run(after())
        assert isinstance(last, ResultMessage) and float(np.max(np.abs(last.outputs[out] - ref[7:8]))) <= TOL
