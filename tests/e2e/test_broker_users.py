"""Broker users per role (`splitinfer broker-users`, on the real broker): a client's credentials run inference
through a real cluster, but the broker refuses them a control order (on the control exchange, or straight into a
server's queue through the default exchange), a look at other clients' answers, and a deploy; a server's cannot
delete the jobs queue."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid

import aio_pika
import aiormq.exceptions
import numpy as np
import pytest

from splitinfer.client import Client, ClientError
from splitinfer.messages import LoadPart, ResultMessage, encode
from splitinfer.splitter.manifest import Manifest
from tests.support.actors import dag_reference
from tests.support.broker import requires_broker
from tests.support.cli import cli
from tests.support.up_cluster import up_cluster

pytestmark = [requires_broker, pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl")]

CONFIG = '[[servers]]\nid = "s1"\n\n[[servers]]\nid = "s2"\n'
TOL = 1e-5


async def _refused(url: str, action) -> str:
    """Run `action(channel)` on a connection of `url`'s user; the broker's refusal (its error's name), or ""."""
    conn = await aio_pika.connect(url)
    try:
        channel = await conn.channel(publisher_confirms=True)
        try:
            await action(channel)
        except (aiormq.exceptions.ChannelAccessRefused, aiormq.exceptions.ChannelClosed) as exc:
            return f"{type(exc).__name__}: {exc}"
        return ""
    finally:
        await conn.close()


def test_client_credentials_infer_but_cannot_order_or_eavesdrop(tmp_path, run_prefix, dag_split):
    out = Manifest.load(dag_split).output_names[0]
    xs, ref = dag_reference(dag_split, 1, seed=51)
    with up_cluster(tmp_path, run_prefix, CONFIG, tag="users") as cl:
        prefix = f"t{uuid.uuid4().hex[:8]}"
        made = cli("broker-users", "--prefix", prefix, "--json", env=cl.env)
        assert made.returncode == 0, made.stderr
        urls = {role: v["url"] for role, v in json.loads(made.stdout).items()}
        try:
            async def go():
                async with Client(cl.settings) as operator:
                    dep = await operator.deploy(dag_split, min_servers=2, timeout=300)
                client_settings = cl.settings.model_copy(update={"broker_url": urls["client"]})
                async with Client(client_settings) as c:
                    assert c.id.startswith(f"{prefix}-client-")
                    answer = await c.infer(dep.deployment, xs, deadline_s=60)
                    with pytest.raises(ClientError):  # deploying is an operator's (control) job
                        await c.deploy(dag_split, min_servers=2, timeout=30)
                names = c.names
                order = encode(LoadPart(server_id="s1", deployment=dep.deployment, part="part0"))

                async def order_on_control(ch):
                    ex = await ch.get_exchange(names.control)
                    await ex.publish(aio_pika.Message(order), routing_key=names.load_key("s1"))

                async def order_into_server_queue(ch):
                    await ch.default_exchange.publish(aio_pika.Message(order), routing_key=f"{names.ns}.server.s1")

                async def read_every_answer(ch):
                    q = await ch.declare_queue(f"{names.ns}.client.{prefix}-client-spy", exclusive=True)
                    await q.bind(await ch.get_exchange(names.results), routing_key="#")

                async def delete_jobs_queue(ch):
                    await ch.queue_delete(names.jobs)

                return answer, {
                    "control order": await _refused(urls["client"], order_on_control),
                    "order through the default exchange": await _refused(urls["client"], order_into_server_queue),
                    "every answer": await _refused(urls["client"], read_every_answer),
                    "server deletes the jobs queue": await _refused(urls["server"], delete_jobs_queue),
                }

            answer, refusals = asyncio.run(go())
        finally:
            gone = cli("broker-users", "--prefix", prefix, "--delete", env=cl.env)
            assert gone.returncode == 0 and "deleted 3" in gone.stdout, gone.stdout + gone.stderr
    assert isinstance(answer, ResultMessage) and float(np.max(np.abs(answer.outputs[out] - ref))) <= TOL
    for what, refusal in refusals.items():
        assert "ACCESS_REFUSED" in refusal, f"{what}: not refused ({refusal!r})"
