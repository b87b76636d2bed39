"""Orders to model servers (control keys `load.<server>` / `unload.<server>`, RPC): load a part replica, drop a
part. Used by the optimizer, the supervisor (a restarted server gets its parts back) and the SDK."""

from __future__ import annotations

import asyncio

from splitinfer.actors.transport import RemoteError, RpcClient
from splitinfer.actors.transport.topology import Names
from splitinfer.messages import LoadPart, Reply, UnloadPart

Placement = dict[str, list[str]]  # part -> server id per replica


class ServerOrders:
    def __init__(self, rpc: RpcClient, names: Names):
        self.rpc = rpc
        self.names = names

    async def _order(self, key: str, server: str, msg: LoadPart | UnloadPart, timeout: float) -> Reply:
        try:
            return await self.rpc.call(key, msg, expect=Reply, timeout=timeout)
        except asyncio.TimeoutError:
            return Reply(ok=False, message=f"{server} did not answer within {timeout:g}s")
        except RemoteError as exc:
            return Reply(ok=False, message=str(exc))

    async def load_replica(self, server: str, deployment: str, part: str, replica: int = 0, replicas: int = 1,
                           timeout: float = 300.0) -> Reply:
        order = LoadPart(server_id=server, deployment=deployment, part=part, replica=replica, replicas=replicas)
        return await self._order(self.names.load_key(server), server, order, timeout)

    async def load(self, deployment: str, placement: Placement, timeout: float = 300.0
                   ) -> dict[tuple[str, str], Reply]:
        """Every replica of every part loaded where the placement says; waits for every answer."""

        async def one(part: str, k: int, servers: list[str]) -> tuple[tuple[str, str], Reply]:
            return (part, servers[k]), await self.load_replica(servers[k], deployment, part, k, len(servers), timeout)

        return dict(await asyncio.gather(*(one(p, k, s) for p, s in placement.items() for k in range(len(s)))))

    async def unload(self, deployment: str, placement: Placement, timeout: float = 30.0
                     ) -> dict[tuple[str, str], Reply]:
        """Every server of the placement drops its part of the deployment."""

        async def one(part: str, server: str) -> tuple[tuple[str, str], Reply]:
            order = UnloadPart(server_id=server, deployment=deployment, part=part)
            return (part, server), await self._order(self.names.unload_key(server), server, order, timeout)

        return dict(await asyncio.gather(*(one(p, s) for p, servers in placement.items() for s in servers)))


def failures(answers: dict[tuple[str, str], Reply]) -> str | None:
    """The first failed order as one line, or None when every order succeeded."""
    failed = {k: r.message for k, r in answers.items() if not r.ok}
    if not failed:
        return None
    (part, server), why = next(iter(failed.items()))
    return f"{part} did not load on {server}: {why} ({len(failed)} of {len(answers)} orders failed)"
