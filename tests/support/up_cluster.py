"""A cluster the way a user runs one: `splitinfer up --config cluster.toml` as a real supervisor process, in a
namespace of the test's own; stopped at the end, and checked to leave no actor process behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import psutil

from splitinfer.config import Settings


@contextlib.contextmanager
def up_cluster(root: Path, run_prefix: str, config: str, tag: str = "up", ns: str | None = None,
               store_url: str | None = None, **env_extra: str):
    """Yields (ns, env, settings, up, root, store_url, log); SIGTERM at exit, like Ctrl-C. `ns` runs an existing
    namespace again (a restart of `up`); SPLITINFER_BROKER_URL in env_extra points it at another broker;
    `store_url` (default a SQLite file in root) where the result store writes."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ns = ns or f"{run_prefix}.{tag}{uuid.uuid4().hex[:6]}"
    store_url = store_url or f"sqlite:///{root / 'results.db'}"
    env = {
        **os.environ,
        "SPLITINFER_NAMESPACE": ns,
        "SPLITINFER_CACHE_DIR": str(root / "cache"),
        # profiles belong to the machine: share them with the user's cache and across test runs
        "SPLITINFER_PROFILE_DIR": str(Settings().profile_cache()),
        "SPLITINFER_RESULT_STORE_URL": store_url,
        "SPLITINFER_QUEUE_EXPIRES_S": "600",
        **env_extra,
    }
    cfg = root / "cluster.toml"
    cfg.write_text(config)
    log_path = root / "up.log"
    with open(log_path, "wb") as log:
        up = subprocess.Popen([sys.executable, "-m", "splitinfer.cli", "up", "--config", str(cfg)], env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    # the test's own clients see the cluster's settings (a queue type, a broker URL given in env_extra too)
    extra = {k[len("SPLITINFER_"):].lower(): v for k, v in env_extra.items() if k.startswith("SPLITINFER_")}
    settings = Settings(**{"namespace": ns, "cache_dir": root / "cache", "result_store_url": store_url,
                           "queue_expires_s": 600, "profile_dir": Settings().profile_cache(), **extra})
    try:
        yield SimpleNamespace(ns=ns, env=env, settings=settings, up=up, root=root, store_url=store_url, log=log_path)
    except BaseException:  # the test failed: stop everything it started, then let its failure through
        children = psutil.Process(up.pid).children(recursive=True) if up.poll() is None else []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(up.pid, signal.SIGKILL)
        for p in children:
            with contextlib.suppress(psutil.Error):
                p.kill()
        raise
    children = psutil.Process(up.pid).children(recursive=True) if up.poll() is None else []
    up.send_signal(signal.SIGTERM)
    try:
        rc = up.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(up.pid, signal.SIGKILL)
        raise
    gone, alive = psutil.wait_procs(children, timeout=10)
    for p in alive:
        p.kill()
    text = log_path.read_text(errors="replace")
    assert rc == 0, text[-2000:]
    assert not alive, f"actor processes left running after the supervisor stopped: {alive}"
    assert "all stopped" in text
