"""The test suite, grouped by what a test needs to run:

- `unit/`: pure code in this process: no broker, no subprocesses (messages, codecs, planner, splitter, profiler,
  front-end tracker, result store, topology names, config parsing, the CLI through Typer's CliRunner);
- `integration/`: in-process actors and clients against the real broker (no actor subprocesses);
- `e2e/`: real processes: actor processes, the supervisor (`splitinfer up`), CLI commands in a fresh process,
  fault injection (kill -9, SIGSTOP, a connection closed by the broker);
- `support/`: code the tests share (not tests): broker check, `eventually` (wait for an event, not a fixed time),
  CLI runners, actor clusters and the test driver, small models, planner cases.

Every test run gets its own broker namespace (`run_prefix`, `namespace`) so runs never collide, and whatever the run
left on the broker is deleted at the end. Exhaustive sweeps are marked `slow` and run with --runslow; tests that export PyTorch models are marked `torch` and
run with --runtorch (after `pip install -e .[torch]`). Fixtures
shared by several files are defined here, so a session-scoped one is built once per run.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

RUN_PREFIX = f"t{os.getpid()}{uuid.uuid4().hex[:6]}"

TESTS = Path(__file__).resolve().parent
KIND_ORDER = ("unit", "integration", "e2e")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run exhaustive sweeps marked slow")
    parser.addoption("--runtorch", action="store_true", default=False,
                     help="run the tests marked torch (they need the torch extra: pip install -e .[torch])")


def pytest_collection_modifyitems(config, items):
    # the quick kinds first (unit, then integration, then e2e); a stable sort keeps the order inside each file
    def kind(item) -> int:
        folder = item.path.relative_to(TESTS).parts[0] if item.path.is_relative_to(TESTS) else ""
        return KIND_ORDER.index(folder) if folder in KIND_ORDER else len(KIND_ORDER)

    items.sort(key=kind)
    opt_in = {"slow": ("--runslow", "exhaustive sweep"), "torch": ("--runtorch", "exports a PyTorch model")}
    for marker, (option, why) in opt_in.items():
        if config.getoption(option):
            continue
        skip = pytest.mark.skip(reason=f"{why}: opt in with {option}")
        for item in items:
            if marker in item.keywords:
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


# ---------------------------------------------------------------------------------------------- shared fixtures

@pytest.fixture
def forget_core_namespace(namespace):
    """Delete the namespace's core exchanges and queues after the test (in-process actors declare them)."""
    yield
    from tests.support.broker import delete_core_topology

    delete_core_topology(namespace)


@pytest.fixture(scope="session")
def dag_split(tmp_path_factory):
    """The fork/join model in 4 parts: part0 = stem (the fork), part1 = branch_a, part2 = branch_b,
    part3 = join + head (2 inputs)."""
    from tests.support.actors import build_dag_split

    return build_dag_split(tmp_path_factory.mktemp("dag"))


@pytest.fixture(scope="session")
def mnv3_split(tmp_path_factory):
    """MobileNetV3Large in 5 parts (`splitinfer split --parts 5`)."""
    from tests.support.actors import build_mnv3_split

    return build_mnv3_split(tmp_path_factory.mktemp("mnv3") / "split")


@pytest.fixture
def cluster_factory(namespace, tmp_path):
    """Make `Cluster`s of actor processes in the test's namespace; stopped (and their topology deleted) at the end."""
    from tests.support.actors import Cluster

    made: list[Cluster] = []

    def make(**env) -> Cluster:
        c = Cluster(namespace, tmp_path, **env)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()
        if c.deployment_parts:
            c.forget(*c.deployment_parts)
