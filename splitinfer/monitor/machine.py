"""What machine a measurement was taken on: the fingerprint that keys cached profiles and calibrations.

Loads without TensorFlow, so that reading a profile or a calibration (which record a MachineInfo) does not load it;
the functions that ask TF about itself import it when called."""

from __future__ import annotations

import hashlib
import json
import os
import platform

import psutil
from pydantic import BaseModel


class MachineInfo(BaseModel):
    fingerprint: str
    hostname: str
    cpu: str
    logical_cores: int
    memory_gb: float
    intra_op_threads: int  # as TF will use them (0 in TF's config means "all cores", stored resolved)
    inter_op_threads: int
    tensorflow: str
    keras: str


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float:
    try:
        return round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # psutil is a dependency, but a fingerprint must never fail
        return 0.0


def tf_threads() -> tuple[int, int]:
    """(intra, inter) op threads TF runs with in this process, with 0 ("default") resolved to the core count."""
    import tensorflow as tf  # lazy: loads TensorFlow

    cores = os.cpu_count() or 1
    intra = tf.config.threading.get_intra_op_parallelism_threads() or cores
    inter = tf.config.threading.get_inter_op_parallelism_threads() or cores
    return int(intra), int(inter)


def machine_info() -> MachineInfo:
    """This machine and TF configuration. The fingerprint leaves out the hostname: identical boxes share profiles."""
    from splitinfer import _tf  # noqa: F401  (lazy: loads TensorFlow)
    import keras  # lazy: with TensorFlow
    import tensorflow as tf  # lazy: loads TensorFlow

    intra, inter = tf_threads()
    fields = {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count() or 1,
        "memory_gb": _memory_gb(),
        "intra_op_threads": intra,
        "inter_op_threads": inter,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }
    key = json.dumps({**fields, "machine": platform.machine()}, sort_keys=True)
    return MachineInfo(
        fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16], hostname=platform.node(), **fields
    )


def apply_threads(intra: int | None, inter: int | None = None) -> None:
    """Set TF's thread pools before the runtime starts (servers use settings.intra_op_threads; profile likewise).

    Once TF has initialised its runtime the pools cannot change; then this is a no-op if they already match and
    raises RuntimeError otherwise.
    """
    import tensorflow as tf  # lazy: loads TensorFlow

    for value, getter, setter in (
        (intra, tf.config.threading.get_intra_op_parallelism_threads, tf.config.threading.set_intra_op_parallelism_threads),
        (inter, tf.config.threading.get_inter_op_parallelism_threads, tf.config.threading.set_inter_op_parallelism_threads),
    ):
        if value is None or getter() == value:
            continue
        setter(value)
