"""Shared fixtures: every test run gets its own broker namespace so runs never collide."""

from __future__ import annotations

import os
import uuid

import pytest

RUN_PREFIX = f"t{os.getpid()}{uuid.uuid4().hex[:6]}"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run exhaustive sweeps marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="exhaustive sweep: opt in with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def run_prefix() -> str:
    """Unique for this pytest run; prefix every queue, exchange and namespace with it."""
    return RUN_PREFIX


@pytest.fixture
def namespace(run_prefix, request) -> str:
    """A broker namespace unique to this test in this run."""
    return f"{run_prefix}.{uuid.uuid4().hex[:6]}"


def pytest_sessionfinish(session, exitstatus):
    """Delete what this run left on the broker (exchanges never expire by themselves)."""
    import asyncio

    from splitinfer.actors.transport.topology import delete_namespace
    from splitinfer.config import Settings

    asyncio.run(delete_namespace(Settings().broker_url, RUN_PREFIX))
