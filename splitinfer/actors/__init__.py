"""The asyncio actors that talk over RabbitMQ. Each one runs as its own process.

Namespace and broker come from settings: SPLITINFER_NAMESPACE, SPLITINFER_BROKER_URL (and the other SPLITINFER_*
knobs in splitinfer/settings.py). Every actor stops cleanly on SIGTERM/SIGINT (exit code 0); it exits 2 if no
broker answers.

Command lines (CORE actors):

    python -m splitinfer.actors.model_server --id s1 --site edge [--capacity 1.0]
        [--deployment D] [--split-dir DIR] [--part SPEC ...]
      SPEC is `part3` (replica 0 of 1) or `part3@1/2` (replica 1 of 2 replicas); repeat --part or join with ','.
      With --split-dir the parts load from that local split (deployment id defaults to the manifest's split_id);
      without it they are fetched from the model pool over the broker (chunked, sha256-checked; needs
      --deployment). With no --part the server starts empty and waits for LoadPart orders on
      `<ns>.control` key `load.<id>` (what `splitinfer deploy` sends). `--server-id` is an alias of `--id`.

    python -m splitinfer.actors.registry [--id registry]
      Tracks Register/Heartbeat/Deregister on `<ns>.control`, answers WhoHosts queries (key `registry.query`).

    python -m splitinfer.actors.model_pool [--id pool] [--dir DIR]
      Stores deployments (manifest + part files) under DIR (default settings.pool_dir or
      <cache_dir>/pool/<namespace>); serves and accepts them in chunks over `<ns>.control` (`pool.request`,
      `pool.upload`). Python helpers: `model_pool.upload_split(actor, dir, deployment)`,
      `model_pool.fetch_deployment(actor, deployment, dest)`, `model_pool.send_load_orders(actor, dep, placement)`,
      `registry.who_hosts(actor, deployment=None, part=None)`.

Joins and failover (model_server): each part has an x-consistent-hash exchange (hash-header request_id) bound to
`<ns>.tensors` with the part's input keys, and one queue per replica. Every tensor carries the AMQP header
request_id, so all inputs of a request land in the same replica queue; the server buffers a join's inputs per
request id (bounded, with a timeout that yields an error result). Replica queues are single-active-consumer:
replica k consumes its own queue at once and the others' queues as a standby after settings.standby_delay_s.
When replica k dies (kill -9), RabbitMQ requeues everything it had not acked (inputs are acked only after the
outputs they caused are confirmed) and makes a standby the active consumer of queue k, so partial joins meet
again in one process; when replica k registers again, the standby gives the queue back. Redelivered inputs whose
request was already served are acked without recomputing (bounded LRU); a request recomputed after a crash may
publish its outputs twice, so consumers of final outputs (the front end) keep the first answer per job.

    python -m splitinfer.actors.state_pool [--id state_pool]
      Keeps the latest state of every actor (heartbeats carry the server/device monitors' ServerState: CPU,
      memory, load average, speed, slowdown, site, battery) and every measured link (LinkReport, `state.link`);
      answers GetState (key `state_pool.query`) with ClusterState. `Client.cluster_state()`.

Sites and link emulation (settings `emulate_links`, `links`, `default_link`; off by default): a tensor crossing
from site A to site B waits at its receiver (model server, front end) RTT + bytes/bandwidth of link "A-B", FIFO
per directed link; `Client.set_links()` (SetLinks on key `links.set`) changes the table at run time. Model servers
take `--slowdown X` (compute x X), `--battery`, `--power C,R,I`; the front end `--site` (the client's site).

Modules: `base` (Actor), `topology` (names, routing-key escaping, declarations), `model_server`, `registry`,
`model_pool`; EDGE's `front_end`, `result_store`, `supervisor`; `state_pool`, `monitors` (link following, server /
device / network monitors).
"""
