"""Code the tests share (no tests here): broker check, waiting for events, CLI runners, actor clusters and drivers,
models and planner cases. Shared fixtures that use these live in tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
