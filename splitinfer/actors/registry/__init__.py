"""Registry: who is alive and what each actor hosts. `table` (the liveness table, pure), `actor` (the process:
`python -m splitinfer.actors.registry`), `client` (the typed query any actor or the SDK uses)."""
