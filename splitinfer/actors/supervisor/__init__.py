"""Supervisor: runs a cluster's actor processes and keeps them running. `broker` (is there a broker, a private
node when none answers), `supervisor` (the processes: start, watch, restart, stop; `splitinfer up`)."""

from splitinfer.actors.supervisor.broker import BrokerError, PrivateBroker, broker_answers, ensure_broker
from splitinfer.actors.supervisor.supervisor import ActorProcess, Supervisor, plan_actors

__all__ = ["ActorProcess", "BrokerError", "PrivateBroker", "Supervisor", "broker_answers", "ensure_broker",
           "plan_actors"]
