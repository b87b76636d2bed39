"""The transport beneath every actor and the SDK: one piece per concept.

- `nodes`: where the broker is (one node, or a cluster's URL list), plain connections for admin work;
- `connection`: the robust connection (failing over between a cluster's nodes), its confirmed publishing channel, the namespace's exchanges;
- `topology`: every queue, exchange and routing-key name of a namespace, and their declarations;
- `publisher`: confirmed publishes with bounded retries;
- `deliveries`: messages in hand until acked, requeued or dead-lettered;
- `rpc`: request/response with typed answers;
- `session`: connection + publisher + RPC for code that is not an actor (the SDK, the supervisor);
- `retry`: every retry loop's bounds, and what is worth retrying (by error type);
- `log`: one JSON object per line.
"""

from splitinfer.actors.transport.connection import Connection
from splitinfer.actors.transport.deliveries import Deliveries, header_str
from splitinfer.actors.transport.log import Logger, first_line
from splitinfer.actors.transport.nodes import NoBroker, broker_answers, broker_urls, connect_once, masked
from splitinfer.actors.transport.publisher import Publisher
from splitinfer.actors.transport.retry import Backoff, Forbidden, Unroutable, classify
from splitinfer.actors.transport.rpc import RemoteError, RpcClient, Stopped
from splitinfer.actors.transport.session import Session
from splitinfer.actors.transport.topology import Names, escape_key, unescape_key

__all__ = [
    "Backoff", "Connection", "Deliveries", "Forbidden", "Logger", "Names", "NoBroker", "Publisher", "RemoteError", "RpcClient",
    "Session", "Stopped", "Unroutable", "broker_answers", "broker_urls", "classify", "connect_once", "escape_key", "first_line", "header_str", "masked",
    "unescape_key",
]
