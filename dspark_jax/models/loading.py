"""Loading checkpoints into models: HF target directories, orbax conversions, and the parameter placement.

Only the family rule tables (`models/<family>/checkpoint.py`, `proposers/dspark_checkpoint.py`) know key
names; the conversion engine is `converters` (formats only). Parameters are built abstractly first
(`nnx.eval_shape`), then filled tensor by tensor and placed on the mesh their logical axes ask for.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from converters import fp8, safetensors_io
from converters import loading as conversion
from converters.errors import FormatError
from converters.export import export_tensors
from dspark_jax.config import read_json
from dspark_jax.errors import CheckpointError, ConfigError
from dspark_jax.handles import Target
from dspark_jax.layers.params import Init
from dspark_jax.models import registry
from dspark_jax.sharding import partition_spec

ORBAX_MARKER = "dspark_jax.json"
ORBAX_PARAMS = "params"
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def check_dtype(dtype) -> jnp.dtype:
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise ConfigError(f"dtype {dtype!r} is not a dtype; use 'bfloat16', 'float16' or 'float32'") from e
    if dt not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        raise ConfigError(f"dtype {dtype!r} is not supported; use 'bfloat16', 'float16' or 'float32'")
    return dt


def abstract(make) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and parameter shapes of `make()` without allocating anything."""
    return nnx.split(nnx.eval_shape(make))


def parse_target_config(path: Path):
    cfg = read_json(path)
    return registry.by_model_type(cfg.get("model_type"), str(path)).parse_config(cfg, str(path))


def stop_token_ids(directory: Path) -> tuple[int, ...]:
    """Stop tokens of a checkpoint: `generation_config.json` eos ids, else config.json's, deduplicated."""
    for name in ("generation_config.json", "config.json"):
        path = Path(directory) / name
        if path.exists():
            eos = read_json(path).get("eos_token_id")
            if eos is not None:
                ids = [eos] if isinstance(eos, int) else list(eos)
                return tuple(dict.fromkeys(int(i) for i in ids))
    return ()


def _placer(state: nnx.State, mesh: Mesh | None):
    axes = {path: var.get_metadata().get("axes") for path, var in nnx.to_flat_state(state)}

    def place(path, host):
        if mesh is None:
            return jax.device_put(host)
        return jax.device_put(host, NamedSharding(mesh, partition_spec(host.shape, axes[path], mesh)))

    return place


def fill(state: nnx.State, directory: Path, rules, *, dtype, mesh, layer_map, ignore=None, rename=None) -> nnx.State:
    """Parameters of `state` (abstract) from the safetensors / .bin files of `directory`."""
    flat = dict(nnx.to_flat_state(state))
    shapes = {path: tuple(var.get_value().shape) for path, var in flat.items()}
    # parameters a module keeps in another dtype than the model's (a float32 router) keep it
    dtypes = {path: np.dtype(var.get_value().dtype) for path, var in flat.items()
              if np.dtype(var.get_value().dtype) != np.dtype(dtype)}
    ignore = ignore or (lambda key: False)
    try:
        # block-scaled FP8 weights are dequantised as they stream; skipped keys are never read
        tensors = fp8.dequantize_stream(safetensors_io.iter_checkpoint(directory), fp8.block_size_of(directory), skip=ignore)
        filled = conversion.convert(
            shapes,
            tensors,
            rules,
            dtype=dtype,
            place=_placer(state, mesh),
            layer_map=layer_map,
            ignore=ignore,
            rename=rename or (lambda key: key),
            dtypes=dtypes,
        )
    except CheckpointError:
        raise
    except FormatError as e:
        raise CheckpointError(str(e)) from None
    return nnx.from_flat_state([(p, flat[p].replace(filled[p])) for p in flat])


def checkpoint_tensors(loaded, rules, dtype=None, layer_map=None) -> dict[str, np.ndarray]:
    """The checkpoint tensors of a loaded model under `rules` (the loader's tables read backwards)."""
    layer_map = layer_map if layer_map is not None else loaded.module.layer_map()
    params = [(path, np.asarray(var.get_value())) for path, var in nnx.to_flat_state(loaded.params)]
    try:
        return export_tensors(params, rules, None if dtype is None else jnp.dtype(dtype), layer_map)
    except FormatError as e:
        raise CheckpointError(str(e)) from None


def load_target(path: str | Path, dtype="bfloat16", mesh: Mesh | None = None) -> Target:
    """Load an HF checkpoint directory (or one written by `convert_to_orbax`) as a `Target`."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"target checkpoint directory {directory} does not exist")
    dt = check_dtype(dtype)
    config = parse_target_config(directory / "config.json")
    family = registry.by_config(config)
    graphdef, state = abstract(lambda: family.model_class(config, Init(nnx.Rngs(0), dt)))
    if (directory / ORBAX_MARKER).exists():
        params = _restore_orbax(directory, state, mesh)
    else:
        params = fill(
            state, directory, family.rules(config), dtype=dt, mesh=mesh,
            layer_map=nnx.merge(graphdef, state).layer_map(), ignore=family.ignore(config), rename=family.rename(config),
        )
    return Target(config=config, graphdef=graphdef, params=params, dtype=dt, directory=directory,
                  stop_token_ids=stop_token_ids(directory))


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


def _restore_orbax(directory: Path, abstract_state: nnx.State, mesh: Mesh | None) -> nnx.State:
    import orbax.checkpoint as ocp

    def spec(var):
        shape, dtype = var.get_value().shape, var.get_value().dtype
        sharding = (
            NamedSharding(mesh, partition_spec(shape, var.get_metadata().get("axes"), mesh))
            if mesh is not None
            else SingleDeviceSharding(jax.devices()[0])
        )
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    target_tree = nnx.to_pure_dict(
        jax.tree.map(lambda v: v.replace(spec(v)), abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    )
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore((directory / ORBAX_PARAMS).absolute(), target_tree)
    except Exception as e:
        raise CheckpointError(f"cannot restore the orbax checkpoint in {directory}: {e}") from e
    state = abstract_state
    nnx.replace_by_pure_dict(state, restored)
    return state
