"""The cluster file (cluster.toml): which actors run, the model servers with their sites, replicas, emulated
slowdown, power figures and memory limits, and the emulated links between sites. `splitinfer up` starts what it
describes; `splitinfer plan` plans on it offline: one schema for both."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError, field_validator

from splitinfer.messages import LinkSpec, PowerSpec, split_pair


class ConfigError(Exception):
    """A cluster description or setting the user can fix (shown as one line by the CLI)."""


class ServerSpec(BaseModel):
    id: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    site: str = "edge"
    replicas: int = Field(1, ge=1, le=64, description="processes for this server entry: ids <id>-1..<id>-k if k>1")
    capacity: float = Field(1.0, gt=0)
    slowdown: float = Field(1.0, ge=1.0, description="emulate a slower device: compute takes this many times longer")
    battery: bool | None = Field(None, description="report a battery level (default: only at site 'device')")
    power: PowerSpec | None = Field(None, description="the simulated battery's power figures (watts)")
    memory_mb: float | None = Field(None, gt=0, description="weights this server may hold (the planner's limit)")

    def process_ids(self) -> list[str]:
        return [self.id] if self.replicas == 1 else [f"{self.id}-{k}" for k in range(1, self.replicas + 1)]


class ClusterConfig(BaseModel):
    """```toml
    namespace = "splitinfer"                      # optional, else settings
    broker_url = "amqp://guest:guest@localhost:5672/"  # optional, else settings
    private_broker = false                        # true: start a private broker if none answers (else an error)
    private_broker_port = 5673                    # its port
    front_end = true
    result_store = true
    front_end_site = "device"                     # the client's site (optional)
    metrics_port = 9300                           # optional: /metrics, /healthz, /readyz on 9300, 9301, ...
    emulate_links = true                          # optional, default off (settings.emulate_links)
    [[servers]]
    id = "device"
    site = "device"
    slowdown = 4.0                                # optional: emulate a device 4x slower than this machine
    power = {compute_w = 2.5, radio_w = 1.2, idle_w = 0.3}   # optional: simulated battery's figures
    [[servers]]
    id = "edge"
    site = "edge"
    replicas = 2                                  # edge-1, edge-2
    [links]                                       # symmetric; unlisted pairs: no delay
    device-edge = {rtt_ms = 40, bandwidth_mbps = 20}
    ```"""

    namespace: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    broker_url: str | None = None
    private_broker: bool = False
    metrics_port: int = Field(0, ge=0, le=65000, description="the first actor's /metrics port, the next +1, ...")
    private_broker_port: int = Field(5673, ge=1024, le=65000)
    front_end: bool = True
    result_store: bool = True
    registry: bool = True
    model_pool: bool = True
    state_pool: bool = True
    optimizer: bool = True
    servers: list[ServerSpec] = Field(default_factory=list)
    # sites and link emulation (off unless emulate_links = true); [links] "siteA-siteB" = {rtt_ms, bandwidth_mbps}
    front_end_site: str = Field("", description="the client's site: jobs' inputs leave from it")
    emulate_links: bool | None = None
    links: dict[str, LinkSpec] = Field(default_factory=dict)
    default_link: LinkSpec | None = None

    @field_validator("links")
    @classmethod
    def _link_keys(cls, links: dict[str, LinkSpec]) -> dict[str, LinkSpec]:
        for key in links:
            split_pair(key)
        return links

    def link_env(self) -> dict[str, str]:
        """SPLITINFER_* variables that carry the link emulation to every actor process (none when not set)."""
        env: dict[str, str] = {}
        if self.emulate_links is not None:
            env["SPLITINFER_EMULATE_LINKS"] = "true" if self.emulate_links else "false"
        if self.links:
            env["SPLITINFER_LINKS"] = json.dumps({k: v.model_dump() for k, v in self.links.items()})
        if self.default_link is not None:
            env["SPLITINFER_DEFAULT_LINK"] = self.default_link.model_dump_json()
        return env

    @field_validator("servers")
    @classmethod
    def _unique_ids(cls, servers: list[ServerSpec]) -> list[ServerSpec]:
        seen: set[str] = set()
        for s in servers:
            for pid in s.process_ids():
                if pid in seen:
                    raise ValueError(f"server id {pid!r} appears twice")
                seen.add(pid)
        return servers

    @classmethod
    def load(cls, path: Path) -> "ClusterConfig":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"cluster config not found: {path}") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read cluster config {path}: {exc}") from None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "(top level)"
            raise ConfigError(f"cluster config {path}: {where}: {err['msg']}") from None

    @property
    def control_plane(self) -> bool:
        """Runs any of the namespace's one-per-cluster actors (else: servers joining a running cluster)."""
        return any((self.registry, self.state_pool, self.model_pool, self.result_store, self.optimizer,
                    self.front_end))

    def without_servers(self) -> "ClusterConfig":
        """The control plane alone (`splitinfer up --control-plane`): servers join with `splitinfer server`."""
        return self.model_copy(update={"servers": []})

    @classmethod
    def server_only(cls, spec: ServerSpec, **kw) -> "ClusterConfig":
        """One model server joining a running cluster (`splitinfer server`): no control plane of its own."""
        return cls(servers=[spec], front_end=False, result_store=False, registry=False, model_pool=False,
                   state_pool=False, optimizer=False, **kw)

    @classmethod
    def default(cls, servers: int = 1, sites: tuple[str, ...] = ("device", "edge", "cloud")) -> "ClusterConfig":
        return cls(servers=[ServerSpec(id=f"s{i + 1}", site=sites[min(i, len(sites) - 1)] if servers <= len(sites)
                                       else sites[i % len(sites)]) for i in range(servers)])
