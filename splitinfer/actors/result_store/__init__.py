"""Result store: every result and error published to `<ns>.results`, kept and queryable. `store` (SQLite, pure),
`actor` (the process: `python -m splitinfer.actors.result_store`)."""
