"""The dead-letter queue `<ns>.dead`, for operators: what is in it and why, send it back where it was going, or
empty it (`splitinfer dead`). The queue itself is bounded (topology.QueuePolicy: length, bytes, age).

A dead letter says why in `x-splitinfer-*` headers when an actor put it there (code, reason, actor, time, the
exchange and routing key it came by); one the broker moved there itself (a rejected delivery) says where it came
from in its `x-death` header instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from splitinfer.actors.transport.topology import DEAD_HEADER_PREFIX, Names


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


@dataclass(frozen=True)
class DeadLetter:
    code: str
    reason: str
    actor: str
    age_s: float | None
    exchange: str       # where it was going: `splitinfer dead --requeue` publishes it there again
    routing_key: str
    job_id: str
    size: int

    @classmethod
    def of(cls, message: AbstractIncomingMessage, now: float | None = None) -> "DeadLetter":
        h = message.headers or {}
        mine = {k[len(DEAD_HEADER_PREFIX):]: v for k, v in h.items() if k.startswith(DEAD_HEADER_PREFIX)}
        exchange, key, code, at = _text(mine.get("exchange")), _text(mine.get("routing-key")), _text(mine.get("code")), \
            mine.get("time")
        if not mine:  # dead-lettered by the broker (a reject): its x-death says where from
            death = (h.get("x-death") or [{}])[0]
            exchange = _text(death.get("exchange"))
            keys = death.get("routing-keys") or [""]
            key, code = _text(keys[0]), _text(death.get("reason") or "rejected")
            stamp = death.get("time")
            at = stamp.timestamp() if hasattr(stamp, "timestamp") else None
        now = time.time() if now is None else now
        return cls(code=code, reason=_text(mine.get("reason")), actor=_text(mine.get("actor")),
                   age_s=None if not isinstance(at, (int, float)) else max(0.0, now - at), exchange=exchange,
                   routing_key=key, job_id=_text(h.get("job_id") or h.get("request_id")), size=len(message.body))


async def count(channel: AbstractChannel, names: Names) -> int:
    q = await channel.declare_queue(names.dead, passive=True)
    return int(q.declaration_result.message_count or 0)


async def peek(channel: AbstractChannel, names: Names, limit: int) -> list[DeadLetter]:
    """The oldest `limit` dead letters, left in the queue (taken unacked, handed back when the channel closes)."""
    q = await channel.declare_queue(names.dead, passive=True)
    out: list[DeadLetter] = []
    for _ in range(limit):
        message = await q.get(no_ack=False, fail=False)
        if message is None:
            break
        out.append(DeadLetter.of(message))
    return out


async def requeue(channel: AbstractChannel, names: Names, limit: int | None = None) -> tuple[int, int]:
    """Send dead letters back where they were going (their reason headers removed), each acked once the broker
    confirmed its new publish. (sent back, left: no known destination or unroutable now)."""
    q = await channel.declare_queue(names.dead, passive=True)
    sent = left = 0
    seen = 0
    total = await count(channel, names)
    while (limit is None or seen < limit) and seen < total:
        message = await q.get(no_ack=False, fail=False)
        if message is None:
            break
        seen += 1
        letter = DeadLetter.of(message)
        if not letter.routing_key:
            left += 1
            continue  # handed back when the channel closes
        headers = {k: v for k, v in (message.headers or {}).items()
                   if not k.startswith(DEAD_HEADER_PREFIX) and k != "x-death"}
        exchange = channel.default_exchange if letter.exchange == "" else \
            await channel.get_exchange(letter.exchange, ensure=False)
        try:
            await exchange.publish(aio_pika.Message(message.body, headers=headers, reply_to=message.reply_to,
                                                    correlation_id=message.correlation_id,
                                                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                                   routing_key=letter.routing_key, mandatory=True)
        except Exception:
            left += 1
            continue
        await message.ack()
        sent += 1
    return sent, left


async def purge(channel: AbstractChannel, names: Names) -> int:
    q = await channel.declare_queue(names.dead, passive=True)
    result = await q.purge()
    return int(getattr(result, "message_count", 0) or 0)
