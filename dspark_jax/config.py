"""Configuration types.

Static configs (hashable, frozen) describe architectures and compiled shapes: changing one compiles a new
program. `SamplingParams` is the traced, per-row counterpart: changing its values never recompiles.
The architecture always comes from the checkpoint's own `config.json` (parsed in `converters.hf_config`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.errors import ConfigError, InputError


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one attention type (HF `rope_parameters` semantics).

    `rope_type`: "default", "yarn" (HF generic YaRN, cos/sin scaled by `attention_factor`) or
    "proportional" (Gemma 4 global layers: only the first `partial_rotary_factor * head_dim / 2`
    frequencies are non-zero, exponent denominator is the full head dim).
    """

    theta: float = 10000.0
    rope_type: str = "default"
    partial_rotary_factor: float = 1.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    max_position_embeddings: int | None = None


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Qwen3 dense (`qwen3`) and Qwen3-MoE (`qwen3_moe`) text decoders."""

    family: ClassVar[str] = "qwen3"

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig(theta=1e6)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 40960
    # Mixture of experts (qwen3_moe). `moe_layers[i]` says whether layer i is sparse.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: tuple[bool, ...] = ()

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0 and any(self.moe_layers)


SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclasses.dataclass(frozen=True)
class Gemma4Config:
    """Gemma 4 text decoders: `gemma4` (E2B/E4B/26B-A4B/31B) and `gemma4_unified` (12B).

    Two attention geometries: sliding layers (`head_dim`, `num_kv_heads`, window `sliding_window`,
    `rope_sliding`) and full layers (`global_head_dim`, `num_global_kv_heads`, `rope_full`; with
    `attention_k_eq_v` they have no value projection). The last `num_kv_shared_layers` layers reuse the
    K/V of the last earlier layer of their type. `gemma4_unified` has no per-layer inputs and no MoE.
    """

    family: ClassVar[str] = "gemma4"

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_types: tuple[str, ...]
    sliding_window: int
    head_dim: int
    num_kv_heads: int
    global_head_dim: int
    num_global_kv_heads: int
    rope_sliding: RopeConfig = RopeConfig(theta=10000.0)
    rope_full: RopeConfig = RopeConfig(theta=1e6, rope_type="proportional", partial_rotary_factor=0.25)
    attention_k_eq_v: bool = False
    final_logit_softcapping: float | None = None
    rms_norm_eps: float = 1e-6
    activation: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 131072
    # Per-layer inputs (PLE, E2B/E4B): 0 disables them.
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int = 0
    # KV sharing across layers (E2B/E4B) and the double-wide MLP of the sharing layers (E2B).
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    # Mixture of experts in parallel with the dense MLP (26B-A4B), in every layer when enabled.
    enable_moe_block: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0

    def __post_init__(self):
        if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= {SLIDING, FULL}:
            raise ConfigError(
                f"Gemma 4 layer_types must list {self.num_layers} entries of {SLIDING!r} / {FULL!r}, got {self.layer_types}"
            )
        first_shared = self.num_layers - self.num_kv_shared_layers
        if not 0 <= self.num_kv_shared_layers < self.num_layers:
            raise ConfigError(f"num_kv_shared_layers={self.num_kv_shared_layers} must be in [0, num_hidden_layers)")
        if not set(self.layer_types[first_shared:]) <= set(self.layer_types[:first_shared]):
            raise ConfigError(
                "num_kv_shared_layers: every attention type of the KV-sharing layers needs an earlier layer of that "
                f"type to share from (layer_types={list(self.layer_types)})"
            )
        if self.enable_moe_block and not (0 < self.top_k_experts <= self.num_experts and self.moe_intermediate_size > 0):
            raise ConfigError(
                f"enable_moe_block needs num_experts >= top_k_experts > 0 and moe_intermediate_size > 0, got "
                f"{self.num_experts}, {self.top_k_experts}, {self.moe_intermediate_size}"
            )

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def layer_head_dim(self, layer: int) -> int:
        return self.head_dim if self.is_sliding(layer) else self.global_head_dim

    def layer_kv_heads(self, layer: int) -> int:
        return self.num_kv_heads if self.is_sliding(layer) else self.num_global_kv_heads

    def layer_k_eq_v(self, layer: int) -> bool:
        return self.attention_k_eq_v and not self.is_sliding(layer)

    def layer_intermediate_size(self, layer: int) -> int:
        wide = self.use_double_wide_mlp and self.kv_source(layer) != layer
        return self.intermediate_size * (2 if wide else 1)

    def kv_source(self, layer: int) -> int:
        """The layer whose keys/values `layer` attends over: itself, or for a KV-sharing layer the last
        non-sharing layer of the same type (HF `kv_sharing_modes` "store"/"reuse")."""
        first_shared = self.num_layers - self.num_kv_shared_layers
        if layer < first_shared:
            return layer
        kind = self.layer_types[layer]
        return max(i for i in range(first_shared) if self.layer_types[i] == kind)

    @property
    def cache_layers(self) -> tuple[int, ...]:
        """Layers that own a KV cache (every layer but the KV-sharing ones), in cache order."""
        return tuple(range(self.num_layers - self.num_kv_shared_layers))


@dataclasses.dataclass(frozen=True)
class DraftConfig:
    """A DSpark / DFlash draft in the DeepSpec layout (`Qwen3DSparkModel` / `Gemma4DSparkModel`).

    `family` selects the backbone numerics: "qwen3" (Llama-style norms, SiLU, 1/sqrt(H) scale) or
    "gemma4" (scaled embedding, K=V, v-norm, proportional RoPE, scale 1.0, sandwich norms, soft-cap).
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    block_size: int
    target_layer_ids: tuple[int, ...]
    num_target_layers: int
    mask_token_id: int
    markov_rank: int = 0
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = False
    confidence_head_with_markov: bool = False
    attention_bias: bool = False
    activation: str = "silu"
    # Gemma 4 only.
    attention_k_eq_v: bool = False
    final_logit_softcapping: float | None = None
    num_anchors: int = 512

    @property
    def num_features(self) -> int:
        return len(self.target_layer_ids)

    @property
    def hidden_state_indices(self) -> tuple[int, ...]:
        """HF `output_hidden_states` indices of the target features: id -1 -> 0, id k -> k + 1."""
        return tuple(0 if i == -1 else i + 1 for i in self.target_layer_ids)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-row sampling settings, all traced (`[B]` arrays): changing them never recompiles.

    temperature 0 means greedy; top_k 0 means no top-k filter; top_p 1 means no nucleus filter;
    confidence_threshold 0 proposes the whole draft block.
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    confidence_threshold: jax.Array

    @classmethod
    def create(
        cls,
        batch: int,
        *,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        confidence_threshold=0.0,
    ) -> SamplingParams:
        """Broadcast scalars or per-row sequences to `[batch]` arrays, validating every value."""

        def column(name, value, dtype, check, expected):
            arr = np.broadcast_to(np.asarray(value, dtype=np.float64), (batch,)) if np.ndim(value) == 0 else np.asarray(value, dtype=np.float64)
            if arr.shape != (batch,):
                raise InputError(f"{name} must be a scalar or one value per prompt ({batch}), got shape {arr.shape}")
            if not np.all(np.isfinite(arr)) or not np.all(check(arr)):
                raise InputError(f"{name}={value!r} is invalid: expected {expected}")
            return jnp.asarray(arr.astype(dtype))

        return cls(
            temperature=column("temperature", temperature, np.float32, lambda a: a >= 0, "a value >= 0 (0 = greedy)"),
            top_k=column("top_k", top_k, np.int32, lambda a: (a >= 0) & (a == np.round(a)), "an integer >= 0 (0 = off)"),
            top_p=column("top_p", top_p, np.float32, lambda a: (a > 0) & (a <= 1), "a value in (0, 1] (1 = off)"),
            confidence_threshold=column(
                "confidence_threshold", confidence_threshold, np.float32, lambda a: (a >= 0) & (a <= 1), "a value in [0, 1] (0 = off)"
            ),
        )
