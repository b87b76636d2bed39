"""Model-pool messages: deployments (manifest + part files) and source models moved in hash-checked chunks."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from splitinfer.messages.wire import Id, Message


class PoolManifest(Message):
    """A deployment's manifest (JSON text, as `splitter.Manifest` writes it) sent to or from the model pool."""

    TYPE: ClassVar[str] = "pool_manifest"
    deployment: Id
    manifest: str = Field(max_length=16 * 1024 * 1024)


class PartChunk(Message):
    """One chunk of a part file, to the pool (upload) or from it (download)."""

    TYPE: ClassVar[str] = "part_chunk"
    deployment: Id
    file: Id
    index: int = Field(ge=0)
    count: int = Field(ge=1)
    size: int = Field(ge=0)        # whole file, bytes
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # whole file
    data: bytes


class PartRequest(Message):
    """Ask the pool for one chunk of a file (`file` "manifest.json" gives the manifest as PoolManifest, "plans.json"
    a model deployment's PlanTableMessage)."""

    TYPE: ClassVar[str] = "part_request"
    deployment: Id
    file: Id
    index: int = Field(0, ge=0)


class ListDeployments(Message):
    TYPE: ClassVar[str] = "list_deployments"


class DeploymentList(Message):
    """The pool's answer to ListDeployments: plain deployments, and model deployments (a plan table each)."""

    TYPE: ClassVar[str] = "deployment_list"
    deployments: list[str] = Field(default_factory=list)
    models: list[str] = Field(default_factory=list)


class DeleteDeployment(Message):
    """Model pool (key `pool.upload`, RPC): forget a deployment or a model's plan table and its plans' files."""

    TYPE: ClassVar[str] = "delete_deployment"
    deployment: Id
