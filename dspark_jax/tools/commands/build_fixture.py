"""`dspark-jax build-fixture --config configs/fixture_pair.yaml`: train the built-in target + DSpark/DFlash pair."""

from dspark_jax.tools.fixture import add_arguments, run

__all__ = ["add_arguments", "run"]
