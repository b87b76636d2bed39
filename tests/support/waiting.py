"""Wait for something to happen instead of sleeping a fixed time and hoping it did.

`await eventually(predicate)` (and `eventually_sync` in synchronous code) calls the predicate every `interval`
seconds until it returns something truthy, and returns that. The predicate may be a coroutine function, and it may
also `assert`: an AssertionError means "not yet". After `timeout` seconds the wait fails with an AssertionError that
names what was awaited (`message`, a string or a function giving one at that moment) and carries the predicate's
last assertion message, if any.

A sleep whose point is to let time pass (nothing more may arrive within 0.5 s, a duplicate must not show up) is
not a wait for an event and stays a sleep, with a comment saying so.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Callable


def _failure(what: str, timeout: float, last: AssertionError | None) -> AssertionError:
    detail = f": {last}" if last is not None and str(last) else ""
    return AssertionError(f"not within {timeout:g} s: {what}{detail}")


def _name(predicate: Callable[[], Any], message: str | Callable[[], str] | None) -> str:
    if callable(message):
        message = message()
    return message or getattr(predicate, "__qualname__", repr(predicate))


async def eventually(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05,
                     message: str | Callable[[], str] | None = None) -> Any:
    """Poll `predicate()` (sync or async) until it is truthy; return its value, or fail after `timeout` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        last: AssertionError | None = None
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
        except AssertionError as exc:
            value, last = None, exc
        if value:
            return value
        if loop.time() >= deadline:
            raise _failure(_name(predicate, message), timeout, last) from last
        await asyncio.sleep(interval)


def eventually_sync(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05,
                    message: str | Callable[[], str] | None = None) -> Any:
    """The synchronous twin of `eventually`."""
    deadline = time.monotonic() + timeout
    while True:
        last: AssertionError | None = None
        try:
            value = predicate()
        except AssertionError as exc:
            value, last = None, exc
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _failure(_name(predicate, message), timeout, last) from last
        time.sleep(interval)
