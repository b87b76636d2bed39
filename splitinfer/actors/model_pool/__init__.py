"""Model pool: deployments (manifest + part files), plan tables and source models, served over the broker.
`store` (the files, pure), `actor` (the process: `python -m splitinfer.actors.model_pool`), `client` (uploads and
fetches in hash-checked chunks)."""
