"""Loading checkpoints into models: HF target directories, orbax conversions, and the parameter placement.

Only the family rule tables (`models/<family>/checkpoint.py`, `proposers/dspark_checkpoint.py`) know key
names; the conversion engine is `converters` (formats only). Parameters are built abstractly first
(`nnx.eval_shape`), then filled tensor by tensor and placed on the mesh their logical axes ask for.
"""

from __future__ import annotations

import json
import os
import re
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
from dspark_jax.errors import CheckpointError, ConfigError, HubError
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
    """Parameters of `state` (abstract) from the safetensors / .bin files of `directory`.

    On a mesh, a safetensors checkpoint is read shard by shard (`fill_sharded`): each process reads only the
    slices its own devices hold. FP8 and `.bin` checkpoints stream whole tensors (each process reads them all)."""
    if mesh is not None:
        index = _sliceable_index(directory)
        if index is not None:
            try:
                return fill_sharded(state, index, rules, dtype=dtype, mesh=mesh, layer_map=layer_map, ignore=ignore,
                                    rename=rename)
            finally:
                index.close()
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


SLICEABLE_DTYPES = ("F64", "F32", "F16", "BF16")


def _sliceable_index(directory: Path):
    """A `CheckpointIndex` of `directory` when its tensors can be read in slices: safetensors whose tensors are all
    plain floats. Quantised storage (block-scaled FP8, packed FP4, their scale tensors) is dequantised by the
    streaming path, which reads whole tensors."""
    try:
        index = safetensors_io.CheckpointIndex(directory)
    except FormatError:  # .bin weights, or a problem the streaming path reports in its own words
        return None
    if any(index.dtype_name(key) not in SLICEABLE_DTYPES for key in index.keys()):
        index.close()
        return None
    return index


def _sources(abstract_shapes: dict, index, rules, *, layer_map, ignore, rename) -> dict:
    """Which checkpoint tensor provides each parameter (each stacked slice of it), from the headers alone:
    `{path: {stack index: (key, kind)}}`. Checks what `converters.loading.convert` checks, without reading data."""
    compiled = [(conversion._template_regex(template), targets) for template, targets in rules]
    sources: dict[tuple, dict[tuple, tuple[str, str]]] = {}
    for raw_key in index.keys():
        if ignore(raw_key):
            continue
        file = index.file_of(raw_key)
        key = rename(raw_key)
        matches = [(m, t) for rx, t in compiled if (m := rx.fullmatch(key))]
        if not matches:
            raise CheckpointError(f"unexpected tensor {raw_key!r} in {file}: this model has no parameter for it")
        match, targets = matches[0]
        for template, kind in targets:
            resolved = conversion.resolve(template, match.groupdict(), layer_map)
            if resolved is None or resolved[0] not in abstract_shapes:
                where = "its layer" if resolved is None else f"parameter {conversion.format_path(resolved[0])}"
                raise CheckpointError(f"unexpected tensor {raw_key!r} in {file}: {where} does not exist in this model")
            path, stack = resolved
            full = tuple(abstract_shapes[path])
            lead = full[: len(stack)]
            expected = tuple(conversion.KINDS[kind][0](full[len(stack):]))
            if index.shape(raw_key) != expected:
                raise CheckpointError(
                    f"tensor {raw_key!r} in {file} has shape {index.shape(raw_key)}, expected {expected} for parameter "
                    f"{conversion.format_path(path)}; the checkpoint does not match its config.json")
            if not all(0 <= i < n for i, n in zip(stack, lead)):
                raise CheckpointError(f"tensor {raw_key!r} in {file}: index {stack} out of range {lead}")
            slot = sources.setdefault(path, {})
            if stack in slot:
                raise CheckpointError(f"tensor {raw_key!r} in {file} sets parameter {conversion.format_path(path)}"
                                      f"{list(stack) if stack else ''} again (already set by {slot[stack][0]!r})")
            slot[stack] = (raw_key, kind)
    for path, shape in abstract_shapes.items():
        slot = sources.get(path)
        # stacked axes: as many as the tensors found for it name (a layer, or a layer and an expert); with none
        # found, as many as the first rule for this path has (for the error message)
        lead_dims = len(next(iter(slot))) if slot else conversion._lead_dims(rules, path, layer_map)
        if slot and any(len(stack) != lead_dims for stack in slot):
            raise CheckpointError(f"parameter {conversion.format_path(path)} is set both whole and by slices; the "
                                  "checkpoint does not match its config.json")
        lead = tuple(shape[:lead_dims])
        wanted = set(np.ndindex(*lead)) if lead_dims else {()}
        missing = sorted(wanted - set(slot or {}))
        if missing:
            keys = [conversion.checkpoint_key(rules, path, m, layer_map) for m in missing[:8]]
            raise CheckpointError(f"checkpoint is missing tensor(s) {keys} (parameter {conversion.format_path(path)})")
    return sources


def fill_sharded(state: nnx.State, index, rules, *, dtype, mesh, layer_map, ignore=None, rename=None) -> nnx.State:
    """Parameters of `state` on `mesh`, each process reading only what its devices hold.

    Every parameter becomes one global array (`jax.make_array_from_callback`): for each of this process's devices
    the callback reads the device's block straight from the memory-mapped tensors (a stacked parameter from the
    layers in the block; within a tensor, only the rows / columns of the block: the layout transforms are views,
    so slicing them reads the bytes the block covers) and casts it. Mapped pages are released after each
    parameter, so a process holds about its devices' share of the model, not the checkpoint."""
    flat = dict(nnx.to_flat_state(state))
    shapes = {path: tuple(var.get_value().shape) for path, var in flat.items()}
    sources = _sources(shapes, index, rules, layer_map=layer_map, ignore=ignore or (lambda key: False),
                       rename=rename or (lambda key: key))
    filled = {}
    for path, var in flat.items():
        shape = shapes[path]
        out_dtype = np.dtype(var.get_value().dtype)  # the model's dtype, or a module's own (a float32 router)
        sharding = NamedSharding(mesh, partition_spec(shape, var.get_metadata().get("axes"), mesh))
        slot = sources[path]
        n_lead = len(next(iter(slot)))

        def block(idx, shape=shape, slot=slot, n_lead=n_lead, out_dtype=out_dtype):
            ranges = [range(*sl.indices(n)) for sl, n in zip(idx, shape)]
            out = np.empty(tuple(len(r) for r in ranges), out_dtype)
            inner = tuple(idx[n_lead:])
            for pos in np.ndindex(*(len(r) for r in ranges[:n_lead])):
                stack = tuple(ranges[d][p] for d, p in enumerate(pos))
                key, kind = slot[stack]
                view = conversion.KINDS[kind][1](index.get(key), shape[n_lead:])
                out[pos] = view[inner]
            return out

        filled[path] = jax.make_array_from_callback(shape, sharding, block)
        index.release()
    return nnx.from_flat_state([(p, flat[p].replace(filled[p])) for p in flat])


def checkpoint_tensors(loaded, rules, dtype=None, layer_map=None) -> dict[str, np.ndarray]:
    """The checkpoint tensors of a loaded model under `rules` (the loader's tables read backwards)."""
    layer_map = layer_map if layer_map is not None else loaded.module.layer_map()
    params = [(path, np.asarray(var.get_value())) for path, var in nnx.to_flat_state(loaded.params)]
    try:
        return export_tensors(params, rules, None if dtype is None else jnp.dtype(dtype), layer_map)
    except FormatError as e:
        raise CheckpointError(str(e)) from None


# What a checkpoint needs from a hub repo: never code (`*.py`), never pickles (`*.bin`), no other formats' copies.
HUB_PATTERNS = (
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?")


def is_hub_id(text: str) -> bool:
    """`owner/name` or `owner/name@revision` (a branch, tag or commit): the form of a Hugging Face repo id."""
    return bool(_HUB_ID.fullmatch(str(text))) and ".." not in str(text)


def resolve_checkpoint(path: str | Path, what: str = "checkpoint") -> Path:
    """A checkpoint directory for `path`: the local directory when one exists (nothing is downloaded), else a
    Hugging Face repo id (`owner/name[@revision]`) fetched with `huggingface_hub.snapshot_download` into the hub
    cache, only the files in `HUB_PATTERNS`. With `HF_HUB_OFFLINE=1` only the cache is used. `what` names the
    argument in errors (e.g. "--target")."""
    if Path(path).exists() or not is_hub_id(str(path)):
        return Path(path)
    repo_id, _, revision = str(path).partition("@")
    try:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise HubError(f"{what} {path!r} is not a local directory, and reading it from the Hugging Face hub needs "
                       "huggingface_hub: pip install huggingface_hub") from e
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None)
    try:
        folder = snapshot_download(repo_id, revision=revision or None, allow_patterns=list(HUB_PATTERNS),
                                   local_files_only=offline, cache_dir=cache)
    except hf_errors.LocalEntryNotFoundError as e:
        if type(e).__name__ == "IncompleteSnapshotError":  # huggingface_hub >= 1: a cached snapshot lacks files
            raise HubError(f"{what} {path!r}: the cached copy is incomplete ({e})") from None
        where = f"the hub cache {cache}" if cache else "the hub cache"
        if offline:
            raise HubError(f"{what} {path!r} is not a local directory and not in {where}, and HF_HUB_OFFLINE is set: "
                           f"download it once online (huggingface-cli download {repo_id}"
                           f"{' --revision ' + revision if revision else ''}) or pass a checkpoint directory") from None
        raise HubError(f"{what} {path!r} is not a local directory, not in {where}, and the hub cannot be reached "
                       f"({e}); check the network or pass a checkpoint directory") from None
    except hf_errors.RevisionNotFoundError:
        raise HubError(f"{what} {path!r}: the hub repo {repo_id} has no revision {revision!r}; pass an existing "
                       "branch, tag or commit after '@'") from None
    except (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError) as e:
        raise HubError(f"{what} {path!r} is not a local directory and not a hub repo this machine may read "
                       f"({type(e).__name__}); check the spelling, or log in (huggingface-cli login) for a gated "
                       "or private repo") from None
    except (hf_errors.HfHubHTTPError, OSError, ValueError) as e:
        raise HubError(f"{what} {path!r}: cannot fetch it from the hub ({e})") from None
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise HubError(f"{what} {path!r}: the hub snapshot {folder} has no config.json; it is not a model checkpoint")
    return folder


def load_target(path: str | Path, dtype="bfloat16", mesh: Mesh | None = None) -> Target:
    """Load an HF checkpoint directory (or one written by `convert_to_orbax`), or a Hugging Face repo id
    (`owner/name[@revision]`, `resolve_checkpoint`), as a `Target`."""
    directory = resolve_checkpoint(path, "target")
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
