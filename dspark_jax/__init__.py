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
    "prompt_lookup",
    "shard_params",
    "stream",
]
