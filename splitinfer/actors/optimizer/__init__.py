"""Optimizer (divider + planner + deployer): a deploy request becomes a plan table whose plans serve. `actor` (the
process: `python -m splitinfer.actors.optimizer`), `client` (deploy and undeploy)."""
