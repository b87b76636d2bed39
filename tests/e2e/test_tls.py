"""TLS to the broker: a private node with a TLS listener (a CA and a server certificate made by the test with
openssl); the whole cluster (`splitinfer up`, its actors, the Client) runs over `amqps://...?cafile=...` and answers
jobs, while the same URL without the CA is refused in one line (the server's certificate cannot be verified)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import numpy as np
import pytest

from splitinfer.actors.supervisor.broker import PrivateBroker, rabbitmq_installed
from splitinfer.actors.transport import NoBroker, Session
from splitinfer.client import Client
from splitinfer.messages import ResultMessage
from splitinfer.splitter.manifest import Manifest
from tests.support.actors import dag_reference
from tests.support.broker import free_port
from tests.support.up_cluster import up_cluster

pytestmark = pytest.mark.skipif(not rabbitmq_installed() or shutil.which("openssl") is None,
                                reason="needs rabbitmq-server and openssl")

CONFIG = '[[servers]]\nid = "s1"\n\n[[servers]]\nid = "s2"\n'
TOL = 1e-5


def _certificates(d) -> dict[str, str]:
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=splitinfer test CA",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key", "-out",
        "server.csr")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "san.ext", "-out", "server.pem")
    return {k: str(d / f) for k, f in (("ca", "ca.pem"), ("cert", "server.pem"), ("key", "server.key"))}


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    certs = _certificates(d)
    tls_port = free_port()
    node = PrivateBroker(free_port(), d / "node", say=lambda m: None, extra_conf=(
        f"listeners.ssl.default = {tls_port}\nssl_options.cacertfile = {certs['ca']}\n"
        f"ssl_options.certfile = {certs['cert']}\nssl_options.keyfile = {certs['key']}\n"
        f"ssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false\n"))
    node.start()
    yield f"amqps://guest:guest@localhost:{tls_port}/", certs
    node.stop()


def test_the_cluster_runs_over_tls_and_an_unverified_broker_is_refused(tmp_path, run_prefix, tls_broker, dag_split):
    url, certs = tls_broker
    verified = f"{url}?cafile={certs['ca']}"
    out = Manifest.load(dag_split).output_names[0]
    xs, ref = dag_reference(dag_split, 1, seed=61)
    with up_cluster(tmp_path, run_prefix, CONFIG, tag="tls", SPLITINFER_BROKER_URL=verified) as cl:
        async def go():
            async with Client(cl.settings) as c:
                dep = await c.deploy(dag_split, min_servers=2, timeout=300)
                return await c.infer(dep.deployment, xs, deadline_s=60)

        answer = asyncio.run(go())
    assert isinstance(answer, ResultMessage) and float(np.max(np.abs(answer.outputs[out] - ref))) <= TOL

    async def unverified():  # the system's CAs do not know the test's: the handshake fails
        session = Session(cl.settings.model_copy(update={"broker_url": url}), "unverified")
        try:
            await session.open(fail_fast=True)
        finally:
            await session.close()

    with pytest.raises(NoBroker, match="no broker answers"):
        asyncio.run(unverified())
