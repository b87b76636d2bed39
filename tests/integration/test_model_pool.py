"""The model pool in-process against the real broker: chunked uploads checked by sha256, unsafe and unknown names
refused, manifests validated, parts served back in chunks."""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np
import pytest

from splitinfer.actors.actor import Actor
from splitinfer.actors.model_pool.actor import ModelPool
from splitinfer.actors.model_pool.client import PoolClient, PoolError
from splitinfer.actors.model_pool.store import chunk_layout
from splitinfer.actors.transport import RemoteError
from splitinfer.actors.transport.topology import Names
from splitinfer.messages import PartChunk, PartRequest, PoolManifest, Reply
from splitinfer.splitter.manifest import Manifest, PartEntry, SourceModel

from tests.support.broker import fast_settings as _settings
from tests.support.broker import requires_broker

pytestmark = [requires_broker, pytest.mark.usefixtures("forget_core_namespace")]


def test_pool_checks_hashes_names_and_unknown_deployments(namespace, tmp_path):
    async def main() -> None:
        s = _settings(namespace, pool_chunk_bytes=1000)
        pool, c = ModelPool("pool", s, directory=tmp_path / "pool"), Actor("c", s)
        await pool.start()
        await c.start()
        try:
            data = np.random.default_rng(0).bytes(2500)
            good = hashlib.sha256(data).hexdigest()
            count, clen = chunk_layout(len(data), 1000)
            assert (count, clen) == (3, 834)

            async def upload(sha: str, name: str = "p.keras") -> Reply:
                r = None
                for i in range(count):
                    r = await c.rpc.call(Names.POOL_UPLOAD, PartChunk(deployment="d", file=name, index=i, count=count,
                                                                      size=len(data), sha256=sha,
                                                                      data=data[i * clen:(i + 1) * clen]))
                return r

            with pytest.raises(RemoteError, match="sha256"):
                await upload("0" * 64)
            with pytest.raises(RemoteError, match="unsafe"):
                await c.rpc.call(Names.POOL_UPLOAD, PartChunk(deployment="d", file="../evil", index=0, count=1, size=1,
                                                              sha256=good, data=b"x"))
            assert (await upload(good)).ok

            def manifest(sha: str) -> str:
                return Manifest(split_id="d", source=SourceModel(name="m", sha256="0" * 64, origin="test"),
                                inputs=[], outputs=[],
                                parts=[PartEntry(name="part0", file="p.keras", sha256=sha, inputs=[], outputs=[],
                                                 operations=[])]).model_dump_json()

            with pytest.raises(RemoteError, match="sha256"):
                await c.rpc.call(Names.POOL_UPLOAD, PoolManifest(deployment="d", manifest=manifest("1" * 64)))
            with pytest.raises(RemoteError, match="invalid manifest"):
                await c.rpc.call(Names.POOL_UPLOAD, PoolManifest(deployment="d", manifest="{}"))
            assert (await c.rpc.call(Names.POOL_UPLOAD, PoolManifest(deployment="d", manifest=manifest(good)))).ok
            chunk = await c.rpc.call(Names.POOL_REQUEST, PartRequest(deployment="d", file="p.keras", index=2))
            assert isinstance(chunk, PartChunk) and chunk.data == data[2 * clen:]
            other = await c.rpc.call(Names.POOL_REQUEST, PartRequest(deployment="d", file="manifest.json", index=0))
            assert isinstance(other, PoolManifest)
            with pytest.raises(RemoteError, match="not a part file"):
                await c.rpc.call(Names.POOL_REQUEST, PartRequest(deployment="d", file="secret.txt"))
            with pytest.raises(PoolError):
                await PoolClient(c.rpc, 1000).fetch_deployment("nope", tmp_path / "dest")
        finally:
            await c.stop()
            await pool.stop()

    asyncio.run(main())
