"""One place for the monitor's JSON documents (profiles, calibrations, compression profiles): a `format` and a
`version` field that loading checks, an atomic save, and the cache rule they share, so a cache never serves a file
of another kind or age."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, TypeVar

from pydantic import BaseModel, Field

from splitinfer.monitor.cache import write_atomic

D = TypeVar("D", bound="VersionedDocument")


class VersionedDocument(BaseModel):
    FORMAT: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    @classmethod
    def from_json(cls: type[D], text: str | bytes) -> D:
        data = json.loads(text)  # Python's json also reads the Infinity / NaN an unbounded error is written as
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT or data.get("version") != cls.VERSION:
            raise ValueError(f"not a {cls.FORMAT} v{cls.VERSION} document")
        return cls.model_validate(data)

    def save(self, path: Path) -> Path:
        write_atomic(Path(path), self.to_json())
        return Path(path)

    @classmethod
    def load(cls: type[D], path: Path) -> D:
        try:
            return cls.from_json(Path(path).read_text())
        except ValueError as exc:
            raise ValueError(f"{path}: {str(exc).splitlines()[0]}") from None

    @classmethod
    def cached(cls: type[D], path: Path, measure: Callable[[], D], *, read: bool = True, write: bool = True) -> D:
        """The document stored at `path` when `read` and it loads; else `measure()`, saved at `path` when `write`.
        A file that does not load (another kind or version, damaged, unreadable) is measured again."""
        if read and path.exists():
            try:
                return cls.load(path)
            except (ValueError, OSError):
                pass
        document = measure()
        if write:
            document.save(path)
        return document


class ModelDocument(VersionedDocument):
    """A document about one model at one input shape and batch (a profile, a compression profile)."""

    model: str
    model_hash: str
    input_shapes: list[list[int]] = Field(description="per model input, without the batch dimension")
    batch: int
