"""dspark_jax: DSpark speculative decoding in JAX.

    import dspark_jax as dj
    target = dj.load_target("path/to/Qwen3-4B")
    draft = dj.load_draft("path/to/dspark_qwen3_4b_block7")     # or dj.prompt_lookup()
    result = dj.generate(target, draft, ["Hello"], max_new_tokens=64)
"""

from __future__ import annotations

from dspark_jax.config import RopeConfig, SamplingParams
from dspark_jax.engine.generation import GenerationResult, GenerationStats, check_pair, generate, stream
from dspark_jax.errors import CheckpointError, ConfigError, DSparkError, InputError
from dspark_jax.handles import Draft, Target
from dspark_jax.models.deepseek_v3.config import DeepseekV3Config
from dspark_jax.models.gemma4.config import Gemma4Config
from dspark_jax.models.qwen3.config import Qwen3Config
from dspark_jax.proposers.dspark import DraftConfig
from dspark_jax.proposers.prompt_lookup import prompt_lookup
from dspark_jax.sharding import make_mesh, shard_params

__version__ = "0.1.0"


def load_target(path=None, dtype="bfloat16", mesh=None) -> Target:
    """Load a target LM from an HF checkpoint directory (or a `dspark-jax convert` output)."""
    from dspark_jax.models.loading import load_target as load

    if path is None:
        from dspark_jax import assets

        path = assets.TARGET
    return load(path, dtype=dtype, mesh=mesh)


def load_draft(path=None, dtype="bfloat16", mesh=None) -> Draft:
    """Load a trained draft: DSpark / DFlash (DeepSpec layout), EAGLE-3 (DeepSpec's or the reduced-vocabulary
    layout), chosen by the checkpoint's `architectures`, or the MTP module of a DeepSeek-V3 target checkpoint
    directory (MTP-1, or chained MTP-k with `draft_length=k`)."""
    from dspark_jax.proposers import load_draft as load

    if path is None:
        from dspark_jax import assets

        path = assets.DSPARK_DRAFT
    return load(path, dtype=dtype, mesh=mesh)


def profile(target: Target, draft: Draft, *, batch_size: int = 1, K: int | None = None, budget_s: float = 15.0):
    """Measure the verify and draft costs of `schedule="auto"` for `batch_size` rows and draft length `K`
    (default: the draft's block size) on this machine, and store them under their backend / device kind /
    target / draft / batch / K key in `$DSPARK_JAX_CACHE/profiles.json` (default `~/.cache/dspark_jax`), where
    later `generate` calls with that key find them (without one they use the deterministic model, which times
    nothing; docs/algorithm.md §4.4). -> (`engine.schedule.Costs`, the file written)."""
    from dspark_jax.engine import generation
    from dspark_jax.engine import schedule as sched

    if not isinstance(target, Target) or not isinstance(draft, Draft):
        raise InputError("profile(target, draft): expected a loaded Target and Draft")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size={batch_size!r}: must be a positive integer")
    if not (isinstance(budget_s, (int, float)) and budget_s > 0):
        raise InputError(f"budget_s={budget_s!r}: must be a positive number of seconds")
    K = generation._draft_length(draft, K)
    costs, path = sched.measure_profile(target, draft, batch_size, K, budget_s=float(budget_s))
    generation.forget_plans(draft)  # the next call reads the new profile
    return costs, path


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DSparkError",
    "DeepseekV3Config",
    "Draft",
    "DraftConfig",
    "GenerationResult",
    "Gemma4Config",
    "GenerationStats",
    "InputError",
    "Qwen3Config",
    "RopeConfig",
    "SamplingParams",
    "Target",
    "check_pair",
    "generate",
    "load_draft",
    "load_target",
    "make_mesh",
    "profile",
    "prompt_lookup",
    "shard_params",
    "stream",
]
