"""State pool: the latest monitored state of every server, device and link, for the optimizer and the front end.
`actor` (the process: `python -m splitinfer.actors.state_pool`), `client` (the typed query)."""
