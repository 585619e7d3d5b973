"""The DSpark draft: a parallel block backbone conditioned on target features, a sequential Markov head and
a confidence head. Knows the target only through hidden size, vocabulary and feature layer ids."""

from dspark_jax.draft.model import DSparkDraft

__all__ = ["DSparkDraft"]
