"""EAGLE-3 draft checkpoints <-> `Eagle3Draft` (docs/eagle3.md §1).

Two layouts load:

* DeepSpec's `Qwen3Eagle3Model` (the reference): keys `layers.0.*`, exactly 5 feature layers, one decoder
  layer, the full target vocabulary. `export_draft` writes this layout for drafts with 5 feature layers.
* The widely used EAGLE-3 layout (`LlamaForCausalLMEagle3`): keys `midlayer.*`, a reduced draft vocabulary
  whose `lm_head` rows map to target tokens through `d2t` (target id = draft id + d2t[draft id]), feature layers
  in `eagle_config.eagle_aux_hidden_state_layer_ids`. Only checkpoints whose decoder layer the Qwen3 blocks
  express load; the rest are refused by name (§7). `export_draft` writes this layout, with the full
  vocabulary (`d2t` all zeros), for drafts whose feature layers are not 5 (e.g. the built-in draft's 3, §9).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from converters.loading import LAYER, Rule, attention_rules
from dspark_jax.config import read_json, require
from dspark_jax.errors import CheckpointError, ConfigError
from dspark_jax.handles import Draft
from dspark_jax.layers.params import Init
from dspark_jax.models.qwen3 import config as qwen3_config
from dspark_jax.proposers.eagle3 import DEEPSPEC, REDUCED_VOCAB, Eagle3Config, Eagle3Draft, VocabMap

DEEPSPEC_ARCHITECTURE = "Qwen3Eagle3Model"
REDUCED_VOCAB_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")
ARCHITECTURES = (DEEPSPEC_ARCHITECTURE, *REDUCED_VOCAB_ARCHITECTURES)
DEEPSPEC_NUM_FEATURE_LAYERS = 5
DEFAULT_DRAFT_LENGTH = 7  # the reference's ttt_length, used when a checkpoint does not say
VOCAB_KEYS = ("d2t", "t2d")


def strip_prefix(key: str) -> str:
    """`torch.compile` checkpoints prefix keys with `_orig_mod.` (docs/algorithm.md §1.1)."""
    return key.removeprefix("_orig_mod.")


def _layer_ids(value, where: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(i) for i in value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: target layer ids {value!r} must be a list of integers") from e
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise ConfigError(f"{where}: target layer ids {list(ids)} must be strictly increasing")
    if any(i < 0 for i in ids):
        raise ConfigError(f"{where}: target layer ids {list(ids)}: EAGLE-3 features are decoder-layer outputs; id -1 "
                          "(the embedding output) is not supported (docs/eagle3.md §7)")
    return ids


def parse_draft_config(path: Path) -> Eagle3Config:
    """Parse an EAGLE-3 draft `config.json` (either layout), refusing what cannot be expressed by name."""
    cfg = read_json(path)
    where = str(path)
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{where}: EAGLE-3 architecture {arch!r} is not supported (EAGLE-3 layers are built from Qwen3 "
                          f"blocks, docs/eagle3.md §7); supported: {', '.join(ARCHITECTURES)}")
    layers = int(require(cfg, "num_hidden_layers", where))
    layers = int(cfg.get("draft_num_hidden_layers") or layers)
    if layers != 1:
        raise ConfigError(f"{where}: num_hidden_layers={layers}: an EAGLE-3 draft here has exactly one decoder layer, "
                          "as the reference's evaluator requires (docs/eagle3.md §7)")
    if cfg.get("norm_before_residual"):
        raise ConfigError(f"{where}: norm_before_residual=true changes the layer's residual stream; not supported (docs/eagle3.md §7)")
    layer = qwen3_config.parse_draft_backbone(cfg, where, 1)
    V = layer.vocab_size
    if arch == DEEPSPEC_ARCHITECTURE:
        ids = _layer_ids(require(cfg, "target_layer_ids", where), where)
        if len(ids) != DEEPSPEC_NUM_FEATURE_LAYERS:
            raise ConfigError(f"{where}: {arch} reads exactly {DEEPSPEC_NUM_FEATURE_LAYERS} target layers, "
                              f"target_layer_ids has {len(ids)} (docs/eagle3.md §7)")
        draft_vocab = cfg.get("draft_vocab_size")
        if draft_vocab is not None and int(draft_vocab) != V:
            raise ConfigError(f"{where}: {arch} has no reduced draft vocabulary (draft_vocab_size {draft_vocab} != "
                              f"vocab_size {V}); docs/eagle3.md §7")
        return Eagle3Config(
            layer=layer, target_layer_ids=ids, draft_length=int(require(cfg, "ttt_length", where)), layout=DEEPSPEC,
            num_target_layers=int(require(cfg, "num_target_layers", where)),
            step_loss_decay=float(cfg.get("step_loss_decay", 0.8) or 0.8),
        )
    eagle = cfg.get("eagle_config") or {}
    ids_value = eagle.get("eagle_aux_hidden_state_layer_ids", cfg.get("eagle_aux_hidden_state_layer_ids"))
    if ids_value is None:
        raise ConfigError(
            f"{where}: the feature layers are not in the config; add \"eagle_config\": {{\"eagle_aux_hidden_state_layer_ids\": "
            "[...]}} with the target layers the draft was trained on (SpecForge's default for an L-layer target is "
            "[1, L//2 - 1, L - 4]); docs/eagle3.md §1.2"
        )
    ids = _layer_ids(ids_value, where)
    draft_vocab = int(cfg.get("draft_vocab_size") or V)
    if not 0 < draft_vocab <= V:
        raise ConfigError(f"{where}: draft_vocab_size {draft_vocab} must be in [1, vocab_size {V}]")
    target_hidden = cfg.get("target_hidden_size")
    return Eagle3Config(
        layer=layer, target_layer_ids=ids, draft_length=int(cfg.get("ttt_length") or DEFAULT_DRAFT_LENGTH),
        layout=REDUCED_VOCAB, num_target_layers=int(cfg["num_target_layers"]) if cfg.get("num_target_layers") else None,
        draft_vocab_size=draft_vocab if draft_vocab < V else None,  # a full draft vocabulary needs no mapping
        target_hidden_size=int(target_hidden) if target_hidden and int(target_hidden) != layer.hidden_size else None,
    )


def _at(rules: list[Rule], layer_path: str) -> list[Rule]:
    """A family layer table (parameters under `LAYER`) for the draft's single, unstacked layer."""
    return [(key, [(tuple(layer_path if p == LAYER else p for p in path), kind) for path, kind in targets])
            for key, targets in rules]


def rules(cfg: Eagle3Config) -> list[Rule]:
    prefix = "layers.0." if cfg.layout == DEEPSPEC else "midlayer."
    table: list[Rule] = [
        ("embed_tokens.weight", [(("embed_tokens",), "copy")]),
        ("lm_head.weight", [(("lm_head",), "copy")]),
        ("norm.weight", [(("norm",), "copy")]),
        ("fc.weight", [(("fc",), "linear")]),
        (prefix + "hidden_norm.weight", [((LAYER, "hidden_norm"), "copy")]),
        (prefix + "input_layernorm.weight", [((LAYER, "input_layernorm"), "copy")]),
        (prefix + "post_attention_layernorm.weight", [((LAYER, "post_attention_layernorm"), "copy")]),
        *attention_rules(prefix, bias=True),
        (prefix + "mlp.gate_proj.weight", [((LAYER, "mlp", "gate_proj"), "linear")]),
        (prefix + "mlp.up_proj.weight", [((LAYER, "mlp", "up_proj"), "linear")]),
        (prefix + "mlp.down_proj.weight", [((LAYER, "mlp", "down_proj"), "linear")]),
    ]
    return _at(table, "layer")


def _read(directory: Path, names) -> dict[str, np.ndarray]:
    """Selected tensors (copied) and every key of a checkpoint directory."""
    from converters.safetensors_io import iter_checkpoint

    found, keys = {}, set()
    for key, array, _ in iter_checkpoint(directory):
        key = strip_prefix(key)
        keys.add(key)
        if key in names:
            found[key] = np.array(array)
    return found, keys


def vocab_map(d2t: np.ndarray, t2d: np.ndarray | None, cfg: Eagle3Config, where: str) -> np.ndarray:
    """Target token id of every draft token, `d + d2t[d]`, checked against the vocabulary and `t2d`."""
    Vd, V = cfg.head_vocab_size, cfg.vocab_size
    d2t = np.asarray(d2t).reshape(-1)
    if d2t.shape != (Vd,) or not np.issubdtype(d2t.dtype, np.integer):
        raise CheckpointError(f"{where}: d2t must be {Vd} integers (one per draft token), got {d2t.dtype} {d2t.shape}")
    ids = np.arange(Vd, dtype=np.int64) + d2t.astype(np.int64)
    if ids.min() < 0 or ids.max() >= V:
        raise CheckpointError(f"{where}: d2t maps draft tokens outside the target vocabulary [0, {V})")
    if len(np.unique(ids)) != Vd:
        raise CheckpointError(f"{where}: d2t maps two draft tokens to the same target token")
    if t2d is not None:
        t2d = np.asarray(t2d).reshape(-1).astype(bool)
        if t2d.shape != (V,) or int(t2d.sum()) != Vd or not t2d[ids].all():
            raise CheckpointError(f"{where}: t2d does not mark exactly the {Vd} target tokens that d2t maps to")
    return ids.astype(np.int32)


def load_draft(path: str | Path, dtype="bfloat16", mesh=None) -> Draft:
    """Load an EAGLE-3 draft (either layout of the module docstring)."""
    import jax
    from flax import nnx

    from dspark_jax.models.loading import abstract, check_dtype, fill

    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"draft checkpoint directory {directory} does not exist")
    dt = check_dtype(dtype)
    config = parse_draft_config(directory / "config.json")
    reduced_layout = config.layout == REDUCED_VOCAB
    extra, keys = _read(directory, VOCAB_KEYS if reduced_layout else ())
    prefix = "layers.0." if config.layout == DEEPSPEC else "midlayer."
    if prefix + "self_attn.q_proj.weight" in keys and prefix + "self_attn.q_norm.weight" not in keys:
        raise ConfigError(
            f"{directory}: the draft's decoder layer has no q_norm/k_norm (a Llama attention layer); EAGLE-3 layers here "
            "are built from the Qwen3 family's attention, which normalises queries and keys, so this draft cannot "
            "run (docs/eagle3.md §7)"
        )
    if "embed_tokens.weight" not in keys:
        raise CheckpointError(f"{directory}: no embed_tokens.weight; copy the target's input embedding into the draft "
                              "checkpoint (docs/eagle3.md §1.2)")
    graphdef, state = abstract(lambda: Eagle3Draft(config, Init(nnx.Rngs(0), dt)))
    weights = nnx.filter_state(state, nnx.Param)
    params = fill(weights, directory, rules(config), dtype=dt, mesh=mesh, layer_map=None,
                  ignore=lambda key: reduced_layout and strip_prefix(key) in VOCAB_KEYS, rename=strip_prefix)
    flat = list(nnx.to_flat_state(params))
    if config.reduced_vocab:
        if "d2t" not in extra:
            raise CheckpointError(f"{directory}: a reduced draft vocabulary ({config.head_vocab_size} < "
                                  f"{config.vocab_size}) needs its d2t tensor")
        ids = vocab_map(extra["d2t"], extra.get("t2d"), config, str(directory))
        flat.append((("vocab_map",), VocabMap(jax.device_put(ids), axes=("vocab",))))
    elif "d2t" in extra and np.any(np.asarray(extra["d2t"]) != 0):
        raise CheckpointError(f"{directory}: draft_vocab_size equals vocab_size but d2t is not the identity")
    return Draft(config=config, graphdef=graphdef, params=nnx.from_flat_state(flat), dtype=dt, directory=directory)


def export_layout(cfg: Eagle3Config) -> str:
    """The layout `export_draft` writes: the reference's when it can express the draft (5 feature layers),
    else the widely used one (docs/eagle3.md §1.2, §9). Reduced-vocabulary drafts are not exported."""
    if cfg.reduced_vocab:
        raise ConfigError("exporting a reduced-vocabulary EAGLE-3 draft is not supported (only full-vocabulary drafts)")
    return DEEPSPEC if len(cfg.target_layer_ids) == DEEPSPEC_NUM_FEATURE_LAYERS else REDUCED_VOCAB


def config_dict(cfg: Eagle3Config, base: dict | None = None, dtype: str = "bfloat16") -> dict:
    """The `config.json` of an exported draft: the target's config (`base`, if given) with the draft fields of
    the reference's `Qwen3Eagle3Model` (docs/eagle3.md §1.1) or, for a draft that layout cannot express, of the
    widely used `LlamaForCausalLMEagle3` layout with the full vocabulary (§1.2)."""
    if export_layout(cfg) == REDUCED_VOCAB:
        return _reduced_layout_config(cfg, base, dtype)
    out = copy.deepcopy(base) if base else {}
    for key in ("auto_map", "text_config", "rope_theta", "rope_scaling", "block_size", "mask_token_id", "markov_rank",
                "markov_head_type", "enable_confidence_head", "confidence_head_with_markov", "num_anchors"):
        out.pop(key, None)
    out.update(qwen3_config.draft_backbone_fields(cfg.layer))
    out.update(
        architectures=[DEEPSPEC_ARCHITECTURE],
        num_hidden_layers=1,
        draft_num_hidden_layers=1,
        num_target_layers=cfg.num_target_layers,
        target_layer_ids=list(cfg.target_layer_ids),
        ttt_length=cfg.draft_length,
        step_loss_decay=cfg.step_loss_decay,
        tie_word_embeddings=False,
        layer_types=["full_attention"],
        dtype=dtype,
    )
    return out


def _reduced_layout_config(cfg: Eagle3Config, base: dict | None, dtype: str) -> dict:
    out = copy.deepcopy(base) if base else {}
    for key in ("auto_map", "text_config", "rope_theta", "rope_scaling", "block_size", "mask_token_id", "markov_rank",
                "markov_head_type", "enable_confidence_head", "confidence_head_with_markov", "num_anchors",
                "target_layer_ids", "step_loss_decay"):
        out.pop(key, None)
    out.update(qwen3_config.draft_backbone_fields(cfg.layer))
    out.update(
        architectures=[REDUCED_VOCAB_ARCHITECTURES[0]],
        num_hidden_layers=1,
        num_target_layers=cfg.num_target_layers,
        draft_vocab_size=cfg.vocab_size,
        eagle_config={"eagle_aux_hidden_state_layer_ids": list(cfg.target_layer_ids)},
        ttt_length=cfg.draft_length,
        tie_word_embeddings=False,
        dtype=dtype,
    )
    return out


def export_draft(draft: Draft, directory, *, dtype="bfloat16", base_config: dict | None = None) -> Path:
    """Write an EAGLE-3 `Draft` (`config.json` + `model.safetensors`, `[out, in]` Linear weights) in the layout of
    `export_layout`; `dj.load_draft` reads it back bit-exactly at the stored `dtype`."""
    import dataclasses

    import jax.numpy as jnp

    from converters.safetensors_io import save_file
    from dspark_jax.models.loading import checkpoint_tensors

    config = dataclasses.replace(draft.config, layout=export_layout(draft.config))
    cfg = config_dict(config, base_config, str(jnp.dtype(dtype)))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = checkpoint_tensors(draft, rules(config), dtype)
    if config.layout == REDUCED_VOCAB:  # the full vocabulary: every draft token is its target token
        V = config.vocab_size
        tensors.update(d2t=np.zeros(V, np.int64), t2d=np.ones(V, np.bool_))
    save_file(tensors, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return directory
