"""The runtime: asyncio actors that talk over RabbitMQ, each its own process.

- `transport/`: what every actor (and the SDK) stands on: connection, topology (names and declarations),
  publisher, deliveries, RPC, retry policy, logs.
- `actor.py` (the base: lifecycle, consuming, error results), `presence.py` (register, heartbeats, deregister),
  `monitors.py` (link following, server / device / network monitors).
- One package per actor, its pure logic beside it and the typed client other code uses to talk to it:
  `registry/` (table, actor, client), `state_pool/` (actor, client), `model_pool/` (store, actor, client),
  `model_server/` (hosted, joins, batching, runner, actor, client), `front_end/` (tracker, watch, actor),
  `result_store/` (store, actor), `optimizer/` (actor, client).
- `supervisor/`: the broker a cluster runs on (a private node when none answers) and the actor processes.

Each actor runs as `python -m splitinfer.actors.<name> [--id ID] ...` (`splitinfer up` starts them all), with the
namespace and broker from settings (SPLITINFER_NAMESPACE, SPLITINFER_BROKER_URL and the other SPLITINFER_*
knobs in splitinfer/config/settings.py). Every actor stops cleanly on SIGTERM/SIGINT (exit code 0); it exits 2 if no
broker answers, 1 if it could not start.
"""
