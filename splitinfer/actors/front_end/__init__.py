"""Front end: takes inference jobs, chooses a plan per job, sends the inputs, answers each job once. `tracker`
(the jobs' bookkeeping, pure), `watch` (which servers are down, from heartbeats), `actor` (the process:
`python -m splitinfer.actors.front_end`)."""
