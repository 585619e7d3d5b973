"""Reading PyTorch / Hugging Face checkpoints into dspark_jax parameters, and writing them back.

The only package that knows checkpoint formats. `dspark_jax.load_target` / `load_draft` call into here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from converters import hf_config, loading, safetensors_io
from dspark_jax.errors import CheckpointError, ConfigError
from dspark_jax.handles import Draft, Target

ORBAX_MARKER = "dspark_jax.json"
ORBAX_PARAMS = "params"
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _family_module(config):
    from dspark_jax.config import Gemma4Config, Qwen3Config

    if isinstance(config, Qwen3Config):
        from converters import qwen3

        return qwen3
    if isinstance(config, Gemma4Config):
        from converters import gemma4

        return gemma4
    raise ConfigError(f"no converter for {type(config).__name__}")


def _abstract(module_fn):
    module = nnx.eval_shape(module_fn)
    return nnx.split(module)


def _check_dtype(dtype) -> jnp.dtype:
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise ConfigError(f"dtype {dtype!r} is not a dtype; use 'bfloat16', 'float16' or 'float32'") from e
    if dt not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        raise ConfigError(f"dtype {dtype!r} is not supported; use 'bfloat16', 'float16' or 'float32'")
    return dt


def load_target(path: str | Path, dtype="bfloat16", mesh: Mesh | None = None) -> Target:
    """Load an HF checkpoint directory (or one written by `convert_to_orbax`) as a `Target`."""
    from dspark_jax.models import model_class

    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"target checkpoint directory {directory} does not exist")
    dt = _check_dtype(dtype)
    config = hf_config.parse_target_config(directory / "config.json")
    cls = model_class(config)
    graphdef, abstract = _abstract(lambda: cls(config, dtype=dt, rngs=nnx.Rngs(0)))
    if (directory / ORBAX_MARKER).exists():
        params = _restore_orbax(directory, abstract, mesh)
    else:
        fam = _family_module(config)
        rename = fam.rename(config) if hasattr(fam, "rename") else (lambda key: key)  # e.g. Gemma's multimodal prefix
        params = loading.convert(
            abstract,
            safetensors_io.iter_checkpoint(directory),
            fam.rules(config),
            dtype=dt,
            mesh=mesh,
            ignore=fam.ignore(config),
            rename=rename,
        )
    return Target(
        config=config,
        graphdef=graphdef,
        params=params,
        dtype=dt,
        directory=directory,
        stop_token_ids=hf_config.stop_token_ids(directory),
    )


def convert_to_orbax(src: str | Path, dst: str | Path, dtype="bfloat16") -> Path:
    """Convert an HF checkpoint directory into an orbax checkpoint that `load_target` also accepts.

    The destination keeps `config.json`, the generation config and the tokenizer files next to the
    orbax parameter tree, so it is self-contained.
    """
    import orbax.checkpoint as ocp

    src, dst = Path(src), Path(dst).absolute()
    if dst.exists() and any(dst.iterdir()):
        raise CheckpointError(f"output directory {dst} is not empty; choose a new directory")
    target = load_target(src, dtype=dtype)
    dst.mkdir(parents=True, exist_ok=True)
    for name in SIDE_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(dst / ORBAX_PARAMS, nnx.to_pure_dict(target.params))
    (dst / ORBAX_MARKER).write_text(json.dumps({"format": "orbax", "dtype": str(target.dtype), "source": str(src)}, indent=2))
    return dst


def _restore_orbax(directory: Path, abstract: nnx.State, mesh: Mesh | None) -> nnx.State:
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding, SingleDeviceSharding

    from dspark_jax.sharding import partition_spec

    def spec(var):
        shape, dtype = var.get_value().shape, var.get_value().dtype
        sharding = (
            NamedSharding(mesh, partition_spec(shape, var.get_metadata().get("axes"), mesh))
            if mesh is not None
            else SingleDeviceSharding(jax.devices()[0])
        )
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    target_tree = nnx.to_pure_dict(jax.tree.map(lambda v: v.replace(spec(v)), abstract, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore((directory / ORBAX_PARAMS).absolute(), target_tree)
    except Exception as e:
        raise CheckpointError(f"cannot restore the orbax checkpoint in {directory}: {e}") from e
    state = abstract
    nnx.replace_by_pure_dict(state, restored)
    return state


def load_draft(path: str | Path, dtype="bfloat16", mesh: Mesh | None = None) -> Draft:
    """Load a DeepSpec-layout DSpark / DFlash draft (`config.json` + safetensors)."""
    from converters import draft as draft_keys
    from dspark_jax.draft import DSparkDraft

    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"draft checkpoint directory {directory} does not exist")
    dt = _check_dtype(dtype)
    config = hf_config.parse_draft_config(directory / "config.json")
    graphdef, abstract = _abstract(lambda: DSparkDraft(config, dtype=dt, rngs=nnx.Rngs(0)))
    params = loading.convert(
        abstract,
        safetensors_io.iter_checkpoint(directory),
        draft_keys.rules(config),
        dtype=dt,
        mesh=mesh,
        rename=draft_keys.strip_prefix,
    )
    return Draft(config=config, graphdef=graphdef, params=params, dtype=dt, directory=directory)
