"""The registry's typed client: who is alive, and who hosts a deployment or part."""

from __future__ import annotations

from splitinfer.actors.transport import RpcClient
from splitinfer.actors.transport.topology import Names
from splitinfer.messages import ActorInfo, Hosts, WhoHosts


class RegistryClient:
    def __init__(self, rpc: RpcClient):
        self.rpc = rpc

    async def who_hosts(self, deployment: str | None = None, part: str | None = None, include_dead: bool = False,
                        timeout: float | None = None) -> list[ActorInfo]:
        hosts = await self.rpc.call(Names.REGISTRY_QUERY, WhoHosts(deployment=deployment, part=part,
                                                                   include_dead=include_dead),
                                    expect=Hosts, timeout=timeout)
        return list(hosts.actors)

    async def placement(self, deployment: str) -> dict[str, list[str]]:
        """{part: [server id, ...]} of every server (live or recently dead) that hosts a part of the deployment."""
        out: dict[str, list[str]] = {}
        for a in await self.who_hosts(deployment=deployment, include_dead=True):
            for ref in a.parts:
                if ref.deployment == deployment:
                    out.setdefault(ref.part, []).append(a.actor_id)
        return out
