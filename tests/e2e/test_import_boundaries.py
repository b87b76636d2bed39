"""Dependencies point one way: the planner imports no broker code and no TensorFlow. Checked in a fresh
interpreter, so nothing an earlier test imported can hide an import."""

from __future__ import annotations


def test_planner_imports_no_broker_and_no_tensorflow():
    import subprocess
    import sys

    code = (
        "import sys, splitinfer.planner as p; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'aio_pika', 'aiormq', 'pika')]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
