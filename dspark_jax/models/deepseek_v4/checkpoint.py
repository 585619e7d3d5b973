"""DeepSeek-V4 checkpoint rules: hub / transformers keys -> `DeepseekV4Model` parameters (docs/deepseek.md §8).

The rule table is written in the hub layout (DeepSeek's names, no `model.` prefix): `embed.weight`,
`norm.weight`, `head.weight`, `hc_head_{fn,base,scale}`, and per layer `layers.{i}.{attn_norm, ffn_norm}`,
`hc_{attn,ffn}_{fn,base,scale}`, `attn.{wq_a, q_norm, wq_b, wkv, kv_norm, wo_a, wo_b, attn_sink}`,
`attn.compressor.{wkv, wgate, ape, norm}`, `attn.indexer.{wq_b, weights_proj}`,
`attn.indexer.compressor.*`, `ffn.gate.{weight, bias | tid2eid}`, `ffn.experts.{e}.{w1, w2, w3}`,
`ffn.shared_experts.{w1, w2, w3}`. `rename` maps the two other spellings onto it first:

* transformers' in-memory names (`model.layers.{i}.self_attn.q_a_proj.weight`, fused
  `mlp.experts.gate_up_proj` / `down_proj`, ...);
* what transformers' `save_pretrained` writes: the hub names under a `model.` prefix, except
  `model.embed_tokens.weight`, `model.hc_head.hc_{fn,base,scale}` and the main attention's norm written as
  `attn.norm.weight` (the hub's `attn.kv_norm.weight`).

The MTP block (`mtp.*`) is not part of the target (transformers ignores it too).
"""

from __future__ import annotations

import re

from converters.loading import LAYER, Rule
from dspark_jax.models.deepseek_v4.config import DeepseekV4Config

# transformers name -> hub name, applied in order to a key without its `model.` prefix
_TO_HUB: list[tuple[re.Pattern, str]] = [(re.compile(a), b) for a, b in [
    (r"^embed_tokens\.weight$", "embed.weight"),
    (r"^lm_head\.weight$", "head.weight"),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.(attn|ffn)_hc\.(fn|base|scale)$", r".hc_\1_\2"),
    (r"\.attn\.sinks$", ".attn.attn_sink"),
    (r"\.compressor\.indexer\.scorer\.weights_proj\.", ".indexer.weights_proj."),
    (r"\.compressor\.indexer\.q_b_proj\.", ".indexer.wq_b."),
    (r"\.compressor\.indexer\.", ".indexer.compressor."),
    (r"\.compressor\.kv_norm\.", ".compressor.norm."),
    (r"\.compressor\.gate_proj\.", ".compressor.wgate."),
    (r"\.compressor\.kv_proj\.", ".compressor.wkv."),
    (r"\.position_bias$", ".ape"),
    (r"\.attn\.q_a_proj\.", ".attn.wq_a."),
    (r"\.attn\.q_a_norm\.", ".attn.q_norm."),
    (r"\.attn\.q_b_proj\.", ".attn.wq_b."),
    (r"\.attn\.kv_proj\.", ".attn.wkv."),
    (r"\.attn\.o_a_proj\.", ".attn.wo_a."),
    (r"\.attn\.o_b_proj\.", ".attn.wo_b."),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.attn\.norm\.weight$", ".attn.kv_norm.weight"),  # save_pretrained's spelling of the main kv norm
]]


def to_hub(key: str) -> str:
    """The hub name of a checkpoint key in any of the three spellings (module doc)."""
    key = key.removeprefix("model.")
    for pattern, repl in _TO_HUB:
        key = pattern.sub(repl, key)
    return key


def compressor_rules(prefix: str, at: tuple) -> list[Rule]:
    return [
        (prefix + "wkv.weight", [((*at, "wkv"), "linear")]),
        (prefix + "wgate.weight", [((*at, "wgate"), "linear")]),
        (prefix + "ape", [((*at, "ape"), "copy")]),
        (prefix + "norm.weight", [((*at, "norm"), "copy")]),
    ]


def layer_rules(cfg: DeepseekV4Config, prefix: str) -> list[Rule]:
    """One decoder layer's keys under `prefix` (`layers.{i}.`); the layer decides which parameters exist
    (a key for a parameter it lacks is refused by the loader)."""
    del cfg
    attn, ffn = (LAYER, "attn"), (LAYER, "ffn")
    table: list[Rule] = [
        (prefix + "attn_norm.weight", [((LAYER, "attn_norm"), "copy")]),
        (prefix + "ffn_norm.weight", [((LAYER, "ffn_norm"), "copy")]),
    ]
    for block in ("attn", "ffn"):
        table += [
            (prefix + f"hc_{block}_fn", [((LAYER, f"hc_{block}", "fn"), "linear")]),
            (prefix + f"hc_{block}_base", [((LAYER, f"hc_{block}", "base"), "copy")]),
            (prefix + f"hc_{block}_scale", [((LAYER, f"hc_{block}", "scale"), "copy")]),
        ]
    for name in ("wq_a", "wq_b", "wkv", "wo_a", "wo_b"):
        table.append((prefix + f"attn.{name}.weight", [((*attn, name), "linear")]))
    table += [
        (prefix + "attn.q_norm.weight", [((*attn, "q_norm"), "copy")]),
        (prefix + "attn.kv_norm.weight", [((*attn, "kv_norm"), "copy")]),
        (prefix + "attn.attn_sink", [((*attn, "attn_sink"), "copy")]),
        *compressor_rules(prefix + "attn.compressor.", (*attn, "compressor")),
        (prefix + "attn.indexer.wq_b.weight", [((*attn, "indexer", "wq_b"), "linear")]),
        (prefix + "attn.indexer.weights_proj.weight", [((*attn, "indexer", "weights_proj"), "linear")]),
        *compressor_rules(prefix + "attn.indexer.compressor.", (*attn, "indexer", "compressor")),
        (prefix + "ffn.gate.weight", [((*ffn, "gate"), "linear")]),
        (prefix + "ffn.gate.bias", [((*ffn, "bias"), "copy")]),
        (prefix + "ffn.gate.tid2eid", [((*ffn, "tid2eid"), "copy")]),
        (prefix + "ffn.experts.{e}.w1.weight", [((*ffn, "w1", ("stack", "e")), "linear")]),
        (prefix + "ffn.experts.{e}.w3.weight", [((*ffn, "w3", ("stack", "e")), "linear")]),
        (prefix + "ffn.experts.{e}.w2.weight", [((*ffn, "w2", ("stack", "e")), "linear")]),
        (prefix + "ffn.experts.gate_up_proj", [((*ffn, "w1"), "fused_gate"), ((*ffn, "w3"), "fused_up")]),
        (prefix + "ffn.experts.down_proj", [((*ffn, "w2"), "experts")]),
        (prefix + "ffn.shared_experts.w1.weight", [((*ffn, "shared_w1"), "linear")]),
        (prefix + "ffn.shared_experts.w3.weight", [((*ffn, "shared_w3"), "linear")]),
        (prefix + "ffn.shared_experts.w2.weight", [((*ffn, "shared_w2"), "linear")]),
    ]
    return table


def rules(cfg: DeepseekV4Config) -> list[Rule]:
    table: list[Rule] = [
        ("embed.weight", [(("embed",), "copy")]),
        ("norm.weight", [(("norm",), "copy")]),
        ("hc_head_fn", [(("hc_head_fn",), "linear")]),
        ("hc_head_base", [(("hc_head_base",), "copy")]),
        ("hc_head_scale", [(("hc_head_scale",), "copy")]),
        *layer_rules(cfg, "layers.{i}."),
    ]
    if not cfg.tie_word_embeddings:
        table.append(("head.weight", [(("head",), "copy")]))
    return table


MTP_KEY = re.compile(r"^(model\.)?mtp\.")


def ignore(cfg: DeepseekV4Config):
    """MTP blocks (`mtp.*`, read by proposers), a tied head saved anyway, RoPE buffers of old exports."""

    def check(key: str) -> bool:
        return (
            MTP_KEY.match(key) is not None
            or (cfg.tie_word_embeddings and to_hub(key) == "head.weight")
            or key.endswith("inv_freq")
        )

    return check


def rename(cfg: DeepseekV4Config):
    del cfg
    return to_hub
