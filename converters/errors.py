"""The converters' one error: a checkpoint file or tensor cannot be read as the rules say.

`dspark_jax.errors.CheckpointError` derives from it, and the library's loaders raise that one, so callers of
`dspark_jax` catch every error as a `DSparkError`.
"""


class FormatError(ValueError):
    """A checkpoint is missing, corrupt, incomplete, or does not match the parameters it should fill."""
