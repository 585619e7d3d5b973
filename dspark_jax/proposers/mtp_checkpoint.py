"""Loading the MTP module of a DeepSeek-V3 target checkpoint directory as a proposer (`proposers.mtp`).

Hub layout (DeepSeek-V3 `README_WEIGHTS.md`), module `k` stored as HF layer `L + k` (`L` =
`num_hidden_layers`): `model.layers.{L}.{enorm, hnorm, eh_proj, shared_head.norm, shared_head.head,
embed_tokens}` plus a full decoder layer under the same prefix (`input_layernorm`, `self_attn.*`,
`post_attention_layernorm`, `mlp.*`), read with the target family's own layer rules. The embedding and the
head copies are optional: without them the target's `model.embed_tokens.weight` / `lm_head.weight` are read,
as transformers' `MtpModel` shares them. FP8 tensors are dequantised as the checkpoint streams. Only the
first module is used (chained MTP-k applies it `k` times); further modules are skipped. The target's own
tensors are skipped without being read.
"""

from __future__ import annotations

import json
from pathlib import Path

from converters import safetensors_io
from converters.loading import Rule
from dspark_jax.config import read_json
from dspark_jax.errors import CheckpointError, ConfigError
from dspark_jax.handles import Draft
from dspark_jax.layers.params import Init
from dspark_jax.models.deepseek_v3 import checkpoint as v3_checkpoint
from dspark_jax.models.deepseek_v3.config import MODEL_TYPES
from dspark_jax.models.deepseek_v3.config import parse as parse_v3
from dspark_jax.proposers.mtp import DEFAULT_MAX_DRAFT_LENGTH, MTPConfig, MTPProposer


def is_mtp_directory(path) -> bool:
    """Whether `path` is a target checkpoint whose MTP module `load_draft` should read (a DeepSeek-V3 or -V4 config)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") in (*MODEL_TYPES, "deepseek_v4")
    except (json.JSONDecodeError, OSError):
        return False


def checkpoint_keys(directory: Path) -> set[str]:
    """Tensor names of a checkpoint, from its index or safetensors headers (no tensor is read)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    keys: set[str] = set()
    for path in safetensors_io.checkpoint_files(directory):
        if path.suffix == ".bin":
            return set()  # unknown without unpickling: the rules then read the target's shared tensors
        f = safetensors_io.SafetensorsFile(path)
        keys.update(f.keys())
        f.close()
    return keys


def rules(cfg: MTPConfig, keys: set[str]) -> list[Rule]:
    p = f"model.layers.{cfg.layer}."
    table: list[Rule] = [
        (p + "enorm.weight", [(("enorm",), "copy")]),
        (p + "hnorm.weight", [(("hnorm",), "copy")]),
        (p + "eh_proj.weight", [(("eh_proj",), "linear")]),
        (p + "shared_head.norm.weight", [(("shared_head_norm",), "copy")]),
        *v3_checkpoint.layer_rules(cfg.target, "model.layers.{i}."),
    ]
    shared: dict[str, list] = {}
    if p + "embed_tokens.weight" in keys:
        table.append((p + "embed_tokens.weight", [(("embed_tokens",), "copy")]))
    else:
        shared.setdefault("model.embed_tokens.weight", []).append((("embed_tokens",), "copy"))
    if p + "shared_head.head.weight" in keys:
        table.append((p + "shared_head.head.weight", [(("shared_head",), "copy")]))
    elif cfg.target.tie_word_embeddings:
        shared.setdefault("model.embed_tokens.weight", []).append((("shared_head",), "copy"))
    else:
        shared.setdefault("lm_head.weight", []).append((("shared_head",), "copy"))
    return table + list(shared.items())


def ignore(cfg: MTPConfig, table: list[Rule]):
    """Everything but the first MTP module and the shared tensors its rules name."""
    prefix = f"model.layers.{cfg.layer}."
    plain = {key for key, _ in table if "{" not in key}
    return lambda key: not (key.startswith(prefix) or key in plain)


def load_mtp(path, dtype="bfloat16", mesh=None, max_draft_length: int = DEFAULT_MAX_DRAFT_LENGTH) -> Draft:
    """The MTP module of the DeepSeek-V3 checkpoint in `path` as a `Draft` (K up to `max_draft_length`)."""
    from flax import nnx

    from dspark_jax.models.loading import abstract, check_dtype, fill

    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    raw = read_json(directory / "config.json")
    if raw.get("model_type") == "deepseek_v4" and any(k.startswith("dspark_") for k in raw):  # its DSpark draft
        from dspark_jax.proposers.dspark_v4 import load_v4_dspark

        return load_v4_dspark(directory, dtype=dtype, mesh=mesh)
    if raw.get("model_type") == "deepseek_v4":  # its `mtp.0` module (proposers.mtp_v4)
        from dspark_jax.proposers.mtp_v4 import load_v4_mtp

        return load_v4_mtp(directory, dtype=dtype, mesh=mesh, max_draft_length=max_draft_length)
    dt = check_dtype(dtype)
    where = directory / "config.json"
    target = parse_v3(read_json(where), str(where))
    if target.num_mtp_layers < 1:
        raise ConfigError(f"{where}: num_nextn_predict_layers is 0: this DeepSeek-V3 checkpoint has no MTP module")
    cfg = MTPConfig(target=target, layer=target.num_layers, max_draft_length=max_draft_length)
    keys = checkpoint_keys(directory)
    if keys and f"model.layers.{cfg.layer}.eh_proj.weight" not in keys:
        raise CheckpointError(
            f"{directory} declares {target.num_mtp_layers} MTP module(s) but holds no model.layers.{cfg.layer}.* tensors "
            "(transformers' save_pretrained drops them; use the hub checkpoint)"
        )
    graphdef, state = abstract(lambda: MTPProposer(cfg, Init(nnx.Rngs(0), dt)))
    table = rules(cfg, keys)
    params = fill(state, directory, table, dtype=dt, mesh=mesh, layer_map=nnx.merge(graphdef, state).layer_map(),
                  ignore=ignore(cfg, table))
    return Draft(config=cfg, graphdef=graphdef, params=params, dtype=dt, directory=directory)

