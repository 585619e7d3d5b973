"""Parameters -> checkpoint tensors: the key maps of `loading` read backwards.

Every parameter is matched against the same rules table the loader uses (first matching rule wins), and
the loader's transform for that rule's kind is inverted, so a written checkpoint loads back bit-exactly.
Used to write trained drafts in the DeepSpec layout and the fixture target in the HF layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters.loading import Rule, _bind, _format_path
from converters.safetensors_io import save_file
from dspark_jax.config import Qwen3Config
from dspark_jax.errors import CheckpointError

# kind -> destination array (our layout) -> source array (checkpoint layout); inverses of `loading.KINDS`.
INVERSE_KINDS = {
    "copy": lambda a: a,
    "linear": lambda a: a.reshape(a.shape[0], -1).T,  # [in, *out] -> [out, in]
    "linear_in": lambda a: a.reshape(-1, a.shape[-1]).T,  # [*in, out] -> [out, in]
    "reshape": lambda a: a.reshape(-1),
    "experts": lambda a: a.transpose(0, 2, 1),
}


def _match(rules: list[Rule], path: tuple):
    """(checkpoint key template, kind, field bindings, stack field) of the first rule producing `path`."""
    for hf_template, targets in rules:
        for template, kind in targets:
            if kind not in INVERSE_KINDS:
                continue  # fused layouts read two parameters from one tensor; the per-expert rule writes them
            parts = [p for p in template if not isinstance(p, tuple)]
            stack = next((p[1] for p in template if isinstance(p, tuple)), None)
            if len(parts) != len(path):
                continue
            binds = _bind(parts, path)
            if binds is not None:
                return hf_template, kind, binds, stack
    return None


def export_tensors(state: nnx.State, rules: list[Rule], dtype=None) -> dict[str, np.ndarray]:
    """Checkpoint tensors `{key: array}` of a parameter state (cast to `dtype` if given, else kept)."""
    out: dict[str, np.ndarray] = {}
    for path, var in nnx.to_flat_state(state):
        found = _match(rules, path)
        if found is None:
            raise CheckpointError(f"parameter {_format_path(path)} has no checkpoint key in this layout")
        template, kind, binds, stack = found
        value = np.asarray(var.get_value())
        if dtype is not None:
            value = value.astype(jnp.dtype(dtype))
        pieces = [(binds, value)] if stack is None else [({**binds, stack: e}, value[e]) for e in range(value.shape[0])]
        for b, v in pieces:
            key = template.format(**b)
            if key in out:
                raise CheckpointError(f"checkpoint key {key!r} would be written twice (parameter {_format_path(path)})")
            out[key] = np.ascontiguousarray(INVERSE_KINDS[kind](v))
    return out


def qwen3_config_dict(cfg: Qwen3Config, *, eos_token_id=None, pad_token_id=None, dtype: str = "float32") -> dict:
    """An HF `config.json` (transformers-5 dialect) for a dense Qwen3 config."""
    if cfg.is_moe:
        raise CheckpointError("writing Qwen3-MoE configs is not supported")
    if cfg.rope.rope_type != "default":
        raise CheckpointError(f"writing rope_type {cfg.rope.rope_type!r} is not supported (only 'default')")
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": {"rope_theta": cfg.rope.theta, "rope_type": "default"},
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "layer_types": ["full_attention"] * cfg.num_layers,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": dtype,
    }


def export_target(target, directory, *, dtype="float32", eos_token_id=None, pad_token_id=None) -> Path:
    """Write a dense Qwen3 `Target` as an HF checkpoint: `config.json`, `model.safetensors`, `generation_config.json`.

    Tokenizer files are the caller's (copy them next to it).
    """
    from converters import qwen3

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = target.config
    tensors = export_tensors(target.params, qwen3.rules(cfg), dtype)
    save_file(tensors, directory / "model.safetensors")
    eos = list(target.stop_token_ids) if eos_token_id is None else eos_token_id
    (directory / "config.json").write_text(
        json.dumps(qwen3_config_dict(cfg, eos_token_id=eos, pad_token_id=pad_token_id, dtype=str(jnp.dtype(dtype))), indent=2) + "\n"
    )
    gen = {"eos_token_id": eos, "pad_token_id": pad_token_id, "do_sample": True, "temperature": 0.7, "top_p": 0.8,
           "top_k": 20}
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return directory
