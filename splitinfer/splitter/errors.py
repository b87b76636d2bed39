"""The splitter's error, in a module of its own so that what raises it (the manifest, partitions) loads without
TensorFlow."""


class SplitError(ValueError):
    """A split that cannot be made; the message names the problem in one line."""
