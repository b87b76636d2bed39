"""What a model server was ordered to host, kept in a file of its own: a server that restarts (kill -9, a restart
of `splitinfer up`, a reboot of its machine) loads the same parts again by itself, so deployments survive restarts
without anyone redeploying them. Pure: a JSON file, no broker.

An order to load adds a part, an order to unload removes it, a part whose deployment left the pool is dropped
when its reload says so. Parts loaded from a local split (`--split-dir`) are not kept: the command line says
them again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from splitinfer.messages import PartRef


class DesiredParts:
    """Read from its file once, then kept in memory (the server reads it every heartbeat; it alone writes it: one
    process per server id)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._refs: list[PartRef] | None = None

    def load(self) -> list[PartRef]:
        """The parts to host; none when the file is absent or unreadable (then the server starts empty)."""
        if self._refs is None:
            try:
                self._refs = [PartRef.model_validate(r) for r in json.loads(self.path.read_text())]
            except (OSError, ValueError, TypeError):
                self._refs = []
        return list(self._refs)

    def add(self, ref: PartRef) -> None:
        self._save([r for r in self.load() if (r.deployment, r.part) != (ref.deployment, ref.part)] + [ref])

    def remove(self, deployment: str, part: str) -> None:
        kept = [r for r in self.load() if (r.deployment, r.part) != (deployment, part)]
        if self.path.exists():
            self._save(kept)
        self._refs = kept

    def _save(self, refs: list[PartRef]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps([r.model_dump() for r in refs]))
        os.replace(tmp, self.path)
        self._refs = list(refs)
