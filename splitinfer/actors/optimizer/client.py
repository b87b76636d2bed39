"""The optimizer's typed client: deploy a model (plan, split, load every plan) and undeploy it."""

from __future__ import annotations

from splitinfer.actors.transport import RpcClient
from splitinfer.actors.transport.topology import Names
from splitinfer.messages import DeployModel, DeployReply, Reply, UndeployModel


class OptimizerClient:
    def __init__(self, rpc: RpcClient):
        self.rpc = rpc

    async def deploy(self, req: DeployModel, timeout: float) -> DeployReply:
        """The plan table once every plan serves; RemoteError says why not (an SLA no plan meets, a server that is
        not registered, a part that did not load: nothing is left half deployed)."""
        return await self.rpc.call(Names.OPTIMIZER_DEPLOY, req, expect=DeployReply, timeout=timeout)

    async def undeploy(self, name: str, timeout: float) -> Reply:
        return await self.rpc.call(Names.OPTIMIZER_UNDEPLOY, UndeployModel(name=name), expect=Reply, timeout=timeout)
