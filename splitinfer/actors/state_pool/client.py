"""The state pool's typed client: the whole cluster's latest state in one answer."""

from __future__ import annotations

from splitinfer.actors.transport import RpcClient
from splitinfer.actors.transport.topology import Names
from splitinfer.messages import ClusterState, GetState


class StatePoolClient:
    def __init__(self, rpc: RpcClient):
        self.rpc = rpc

    async def get_state(self, include_dead: bool = False, timeout: float | None = None) -> ClusterState:
        return await self.rpc.call(Names.STATE_QUERY, GetState(include_dead=include_dead), expect=ClusterState,
                                   timeout=timeout)
