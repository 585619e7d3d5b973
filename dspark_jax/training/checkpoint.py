"""Training checkpoints with orbax: the whole train state (parameters, optimizer state, step) per saved step.

Everything else a run needs to continue exactly (data order, anchor draws) is a pure function of the
recipe's seed and the step, so restoring the state of step `s` and running on reproduces the same losses.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from dspark_jax.errors import CheckpointError


class Checkpointer:
    """Saves train-state pytrees under `directory/<step>`; keeps the newest `keep` checkpoints."""

    def __init__(self, directory, keep: int = 2):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        """Save the leaves of `state` (any pytree of arrays; its structure comes back from `restore`'s `like`)."""
        leaves = {f"{i:05d}": x for i, x in enumerate(jax.tree.leaves(state))}
        self.manager.save(step, args=ocp.args.StandardSave(leaves))
        self.manager.wait_until_finished()

    def restore(self, step: int, like):
        """Restore step `step` into the structure, shapes and dtypes of `like` (a pytree of arrays)."""
        flat, treedef = jax.tree.flatten(like)
        abstract = {f"{i:05d}": ocp.utils.to_shape_dtype_struct(x) for i, x in enumerate(flat)}
        try:
            restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
            return jax.tree.unflatten(treedef, [restored[f"{i:05d}"] for i in range(len(flat))])
        except Exception as e:  # orbax raises several types for a mismatching or damaged checkpoint
            raise CheckpointError(
                f"cannot restore training checkpoint {self.directory}/{step}: {e}. It was written by a different "
                "recipe (model shape or optimizer); use a new output directory or delete the checkpoints"
            ) from e

    def close(self) -> None:
        self.manager.close()
