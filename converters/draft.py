"""DeepSpec draft checkpoints (`Qwen3DSparkModel` / `Gemma4DSparkModel`, DSpark and DFlash) <-> parameters.

Keys have no `model.` prefix (reference §1.3). `rules` reads them; `export_tensors` writes the same layout
back (PyTorch `[out, in]` Linear weights) so a draft trained here loads in the reference.
"""

from __future__ import annotations

from dspark_jax.config import DraftConfig
from converters.loading import Rule

LAYER = "layers.{i}."


def strip_prefix(key: str) -> str:
    """`torch.compile` checkpoints prefix keys with `_orig_mod.`; the reference strips it, so do we."""
    return key.removeprefix("_orig_mod.")


def rules(cfg: DraftConfig) -> list[Rule]:
    at = ("layers", "{i}", "self_attn")
    ly = ("layers", "{i}")
    table: list[Rule] = [
        ("embed_tokens.weight", [(("embed_tokens",), "copy")]),
        ("lm_head.weight", [(("lm_head",), "copy")]),
        ("fc.weight", [(("fc",), "linear")]),
        ("hidden_norm.weight", [(("hidden_norm",), "copy")]),
        ("norm.weight", [(("norm",), "copy")]),
        (LAYER + "input_layernorm.weight", [((*ly, "input_layernorm"), "copy")]),
        (LAYER + "post_attention_layernorm.weight", [((*ly, "post_attention_layernorm"), "copy")]),
        (LAYER + "mlp.gate_proj.weight", [((*ly, "gate_proj"), "linear")]),
        (LAYER + "mlp.up_proj.weight", [((*ly, "up_proj"), "linear")]),
        (LAYER + "mlp.down_proj.weight", [((*ly, "down_proj"), "linear")]),
        (LAYER + "self_attn.q_proj.weight", [((*at, "q_proj"), "linear")]),
        (LAYER + "self_attn.k_proj.weight", [((*at, "k_proj"), "linear")]),
        (LAYER + "self_attn.v_proj.weight", [((*at, "v_proj"), "linear")]),
        (LAYER + "self_attn.o_proj.weight", [((*at, "o_proj"), "linear_in")]),
        (LAYER + "self_attn.q_norm.weight", [((*at, "q_norm"), "copy")]),
        (LAYER + "self_attn.k_norm.weight", [((*at, "k_norm"), "copy")]),
        (LAYER + "self_attn.q_proj.bias", [((*at, "q_bias"), "reshape")]),
        (LAYER + "self_attn.k_proj.bias", [((*at, "k_bias"), "reshape")]),
        (LAYER + "self_attn.v_proj.bias", [((*at, "v_bias"), "reshape")]),
        (LAYER + "self_attn.o_proj.bias", [((*at, "o_bias"), "copy")]),
        (LAYER + "pre_feedforward_layernorm.weight", [((*ly, "pre_feedforward_layernorm"), "copy")]),
        (LAYER + "post_feedforward_layernorm.weight", [((*ly, "post_feedforward_layernorm"), "copy")]),
        (LAYER + "layer_scalar", [((*ly, "layer_scalar"), "copy")]),
        ("markov_head.markov_w1.weight", [(("markov_head", "markov_w1"), "copy")]),
        ("markov_head.markov_w2.weight", [(("markov_head", "markov_w2"), "copy")]),
        ("markov_head.gate_proj.weight", [(("markov_head", "gate_proj"), "linear")]),
        ("markov_head.gate_proj.bias", [(("markov_head", "gate_bias"), "copy")]),
        ("markov_head.joint_proj.weight", [(("markov_head", "joint_proj"), "linear")]),
        ("markov_head.joint_proj.bias", [(("markov_head", "joint_bias"), "copy")]),
        ("confidence_head.proj.weight", [(("confidence_head", "proj"), "linear")]),
        ("confidence_head.proj.bias", [(("confidence_head", "bias"), "copy")]),
    ]
    return table
