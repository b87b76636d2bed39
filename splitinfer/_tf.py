"""Import TensorFlow quietly: its C++ start-up lines ignore TF_CPP_MIN_LOG_LEVEL, so stderr is muted at the fd level
for the import alone. Every module that needs TF or Keras imports this first."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def _quiet_import() -> None:
    if "tensorflow" in sys.modules or os.environ.get("SPLITINFER_TF_VERBOSE"):
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401  (this module's purpose: import it with stderr muted)
        import keras  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


_quiet_import()
