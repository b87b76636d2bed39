"""Process settings: SPLITINFER_* environment variables (pydantic-settings). Every actor, the Client and the CLI read
them; a test or a scratch cluster passes a modified copy (`settings.model_copy(update=...)`)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from splitinfer.messages import LinkSpec, PowerSpec


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SPLITINFER_",
        env_file=None,
        extra="ignore",
    )

    # One node, or every node of a cluster separated by commas: actors connect to the first that answers and fail
    # over to the others when theirs goes down.
    broker_url: str = "amqp://guest:guest@localhost:5672/"
    # /metrics (Prometheus), /healthz and /readyz of an actor process on this port (0: none); `splitinfer up`
    # gives each process its own, from cluster.toml's metrics_port up. The host to bind: 0.0.0.0 to be scraped
    # from another machine.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    namespace: str = Field(default="splitinfer", pattern=r"^[A-Za-z0-9_.-]+$")
    cache_dir: Path = Path.home() / ".cache" / "splitinfer"
    # Each server process gets this many intra-op threads so several processes don't each claim every core.
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    # Largest tensor message accepted on the data plane (must fit rabbitmq.conf max_message_size).
    max_message_bytes: int = 64 * 1024 * 1024
    verify_tolerance: float = 1e-4

    # --- actor runtime
    heartbeat_interval_s: float = 2.0       # actors push a Heartbeat on <ns>.control this often
    liveness_timeout_s: float = 6.0         # the registry calls an actor dead after this long without one
    prefetch: int = 32                      # unacked deliveries per consumer (must exceed the join buffer's needs)
    join_timeout_s: float = 30.0            # a join's partial inputs wait this long, then an error result
    join_buffer: int = 256                  # partial requests a server holds per part before refusing the oldest
    max_batch: int = Field(default=8, ge=1)  # ready requests of one part run together as one batch, at most this many
    # a ready request waits up to this long for others of its part to join its batch (Triton's max queue delay); 0:
    # the batch is what is ready when the worker is free (under load batches still form while it computes)
    batch_delay_us: int = Field(default=0, ge=0, le=1_000_000)
    local_handoff: bool = True              # consecutive parts hosted in one process run back to back, no broker hop
    max_inflight_jobs: int = Field(default=1024, ge=1)  # jobs a front end tracks at once (its queues' prefetch)
    done_cache: int = 20000                 # request ids remembered per part, for idempotent redelivery
    standby_delay_s: float = 2.0            # replicas subscribe as standby on the other replicas' queues after this
    drain_timeout_s: float = 5.0            # on SIGTERM, finish in-flight work this long, then hand it back
    rpc_timeout_s: float = 15.0
    queue_expires_s: float | None = None    # x-expires on namespace queues (tests set it so they clean up)
    pool_dir: Path | None = None            # model pool storage; default <cache_dir>/pool/<namespace>
    pool_chunk_bytes: int = 1024 * 1024     # part files travel in chunks of this size
    # Result store: sqlite:///relative.db, sqlite:////absolute.db; empty means <cache_dir>/results.db.
    result_store_url: str = ""
    # A job with no deadline of its own gets this one (seconds from submission).
    job_deadline_s: float = Field(default=30.0, gt=0)

    # --- durability and overload (README "Durability")
    # The queues that hold work the broker must keep (jobs, job notices, control services, the result store's and
    # the dead letters): "classic" on one node (fastest), "quorum" on a broker cluster (replicated: a node may
    # fail). The data plane's part queues stay classic: their tensors are recomputed, never the only copy (with
    # several node URLs they are transient too, so a server declares them again on a surviving node).
    queue_type: Literal["classic", "quorum"] = "classic"
    dead_letter_max: int = Field(default=10_000, ge=1)        # the dead-letter queue keeps at most this many
    dead_letter_max_mb: float = Field(default=256.0, gt=0)    # ... and this many MB (the oldest are dropped)
    dead_letter_ttl_s: float = Field(default=7 * 86400.0, gt=0)  # ... each for at most this long
    answer_retention_s: float = Field(default=600.0, ge=0)   # a job id submitted again within this gets its answer
    answer_retention_mb: float = Field(default=64.0, ge=0)   # answers a front end keeps for that, at most
    client_max_inflight: int = Field(default=64, ge=1)       # a Client's jobs in the cluster at once; more wait
    max_batch_mb: float = Field(default=16.0, gt=0)          # a batch's inputs at most (a larger job runs in slices)

    # --- sites, link emulation, monitors (monitor/links.py, actors/monitors.py)
    # Off by default. On: a tensor that crosses from site A to site B waits, at its receiver, RTT + bytes/bandwidth
    # of link "A-B" (the planner's hop cost), transfers on one directed link in FIFO order.
    emulate_links: bool = False
    links: dict[str, LinkSpec] = Field(default_factory=dict)  # "siteA-siteB" -> LinkSpec, symmetric; env: JSON
    default_link: LinkSpec = Field(default_factory=LinkSpec)  # unlisted pairs of sites: no delay
    slowdown: float = Field(default=1.0, ge=1.0)  # a model server's compute takes this many times longer
    speed_gflops: float | None = None       # configured speed: reported instead of the machine's calibration
    calibrate_at_start: bool = True         # servers and the optimizer calibrate the machine if none is cached
    battery: bool | None = None             # report a battery (None: only servers at site "device")
    power: PowerSpec = Field(default_factory=PowerSpec)  # the simulated battery's energy model
    battery_capacity_j: float = Field(default=40_000.0, gt=0)  # simulated battery (about 11 Wh)
    probe_interval_s: float = Field(default=10.0, ge=0)      # network monitor: one round of probes this often; 0: off
    hop_report_interval_s: float = Field(default=5.0, ge=0)  # front end: recent hop timings to the state pool; 0: off
    probe_bytes: int = Field(default=256 * 1024, ge=1024)    # the large probe; the small one is empty
    probe_rounds: int = Field(default=3, ge=1)               # probes of each size per measurement (median)
    memory_limit_mb: float | None = Field(default=None, gt=0)  # a model server: weights it may hold (planner)

    # --- optimizer (actors/optimizer, planner/optimize.py)
    # One broker hop of a tensor as the planner charges it: what the bandwidth sweep fitted end to end on this
    # data plane (README; DESIGN.md's 0.7 ms + 2.5 ms/MB is the bare broker alone). A hop between parts on one
    # server costs nothing (local hand-off).
    broker_per_message_ms: float = Field(default=5.2, ge=0)
    broker_per_mb_ms: float = Field(default=3.3, ge=0)
    replan_interval_s: float = Field(default=10.0, ge=0)  # re-predict deployed plan tables from live state; 0: off
    # Run-time re-planning (planner/adaptive.py): deploy a new plan when planning now beats every deployed plan by
    # replan_threshold on the objective at replan_hold checks in a row, at most once per replan_cooldown_s; retire
    # plans no request would get for replan_retire_after_s; a table never holds more than replan_max_plans.
    adaptive_replanning: bool = True
    learn_costs: bool = True  # fold the front ends' measured hop timings into the cost model (planner/learning.py)
    replan_threshold: float = Field(default=0.15, ge=0, lt=1)
    replan_hold: int = Field(default=2, ge=1)
    replan_cooldown_s: float = Field(default=30.0, ge=0)
    replan_retire_after_s: float = Field(default=300.0, ge=0)
    replan_max_plans: int = Field(default=8, ge=1)
    deploy_timeout_s: float = Field(default=600.0, gt=0)  # a deploy (profile, split, upload, load) gives up after this
    # Profiles and calibrations belong to the machine, not to a cluster: a scratch cluster (tests, the demo) keeps
    # its pool and logs in a cache_dir of its own but reuses this one. None: cache_dir.
    profile_dir: Path | None = None

    def profile_cache(self) -> Path:
        return self.profile_dir or self.cache_dir

    def results_url(self) -> str:
        return self.result_store_url or f"sqlite:///{self.cache_dir / 'results.db'}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
