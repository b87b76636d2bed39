"""The transport beneath every actor and the SDK: one piece per concept.

- `connection`: the robust connection, its confirmed publishing channel, the namespace's exchanges;
- `topology`: every queue, exchange and routing-key name of a namespace, and their declarations;
- `publisher`: confirmed publishes with bounded retries;
- `deliveries`: messages in hand until acked, requeued or dead-lettered;
- `rpc`: request/response with typed answers;
- `session`: connection + publisher + RPC for code that is not an actor (the SDK, the supervisor);
- `retry`: every retry loop's bounds, and what is worth retrying (by error type);
- `log`: one JSON object per line.
"""

from splitinfer.actors.transport.connection import Connection, NoBroker, broker_answers, masked
from splitinfer.actors.transport.deliveries import Deliveries, header_str
from splitinfer.actors.transport.log import Logger, first_line
from splitinfer.actors.transport.publisher import Publisher
from splitinfer.actors.transport.retry import Backoff, Unroutable, classify
from splitinfer.actors.transport.rpc import RemoteError, RpcClient, Stopped
from splitinfer.actors.transport.session import Session
from splitinfer.actors.transport.topology import Names, escape_key, unescape_key

__all__ = [
    "Backoff", "Connection", "Deliveries", "Logger", "Names", "NoBroker", "Publisher", "RemoteError", "RpcClient",
    "Session", "Stopped", "Unroutable", "broker_answers", "classify", "escape_key", "first_line", "header_str", "masked",
    "unescape_key",
]
