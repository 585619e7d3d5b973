"""Compile the library's own programs for a TPU slice ahead of time, on a machine without one (docs/tpu.md).

From configs alone (abstract parameters, no weights), placed by the library's sharding rules (`sharding.RULES`):

    from dspark_jax import aot
    compiled = aot.compile("Qwen3-8B/config.json", "draft/config.json", "spec_round", topology="v5e:2x2",
                           mesh="data=1,model=4", batch=8, capacity=4096, dtype="bfloat16")
    print(aot.report(compiled).summary())

`compile` returns an `AOTProgram`: the compiled object (`.compiled`), its per-chip memory analysis, the optimized
TPU HLO, and what `report` needs (the chip, the cache arrays' per-chip sizes, the bytes a step must move). A
program that does not fit the chip's HBM does not compile (XLA:TPU's `RESOURCE_EXHAUSTED`): `compile` then
returns an `AOTProgram` with `fits=False` and the figures the error names, rather than raising.

Programs: `ar_step` (`engine.decode.step_jit`), `spec_round` / `spec_round_auto` (`engine.spec.spec_step`, fixed
or scheduled), `ar_loop` (`engine.decode.generate_loop`), `spec_loop` / `spec_loop_auto`
(`engine.spec.generate_loop`), `continuous` (`engine.continuous.ar_job` / `spec_job`) and `train_step`
(`training.trainer.train_step`, the draft's). `whole_cache_copies` counts copies of cache-sized buffers in any
compiled program's HLO (CPU-compiled ones too); `estimate_cycles` sums XLA:TPU's per-instruction cycle estimates
over the program as it executes (docs/tpu.md §3).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dspark_jax import compiling, sharding
from dspark_jax.errors import ConfigError, DSparkError, HubError

GIB = 2.0**30


class AOTError(DSparkError, ValueError):
    """A topology, mesh, program or size that cannot be compiled ahead of time as asked."""


# ------------------------------------------------------------------------------------------------ chips

@dataclasses.dataclass(frozen=True)
class Chip:
    """Figures of one TPU chip generation used by `report` (docs/tpu.md §2).

    `hbm_bytes`: HBM per chip as sold; XLA:TPU's own limit (what a program may use) is a little lower and is taken
    from its out-of-memory message when one is seen (v5e: 15.75 GiB of 16). `hbm_bandwidth`: bytes/s per chip.
    `clock_hz`: the TensorCore clock converting XLA's `estimated_cycles` to seconds (v5e 1.5 GHz; the others are
    assumptions, docs/tpu.md §3)."""

    name: str
    hbm_bytes: float
    hbm_bandwidth: float
    clock_hz: float
    usable_fraction: float = 15.75 / 16  # XLA:TPU's usable HBM / nominal, as its OOM message reports on v5e


CHIPS: Mapping[str, Chip] = {
    "v4": Chip("v4", 32 * GIB, 1.2e12, 1.05e9),
    "v5e": Chip("v5e", 16 * GIB, 8.19e11, 1.5e9),
    "v5p": Chip("v5p", 95 * GIB, 2.765e12, 1.75e9),
    "v6e": Chip("v6e", 32 * GIB, 1.64e12, 1.75e9),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}
DEFAULT_HOST_BOUNDS = (2, 2, 1)


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice by name (`v5e:2x2`): its compile-only devices, the chip and how many chips it has."""

    name: str
    chip: Chip
    devices: tuple
    chips: int

    @property
    def devices_per_chip(self) -> int:
        return max(1, len(self.devices) // self.chips)

    @property
    def device_hbm_bytes(self) -> float:
        """Usable HBM of one device (a chip, or a core where the topology shows each core as a device, v4)."""
        return self.chip.hbm_bytes * self.chip.usable_fraction / self.devices_per_chip

    @property
    def device_bandwidth(self) -> float:
        return self.chip.hbm_bandwidth / self.devices_per_chip


def _require_tpu():
    # compile-only use touches no chip: let several processes load libtpu at once (otherwise the second one fails on
    # libtpu's lockfile, docs/tpu.md §1)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - jax always ships it
        raise AOTError(f"jax.experimental.topologies is unavailable ({e})") from None
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise AOTError(
            f"compiling for TPU needs libtpu: pip install 'jax[tpu]=={jax.__version__}' (it pins the matching libtpu; "
            "JAX_PLATFORMS=cpu keeps the default backend on CPU)") from None
    return topologies


_TOPOLOGY_RE = re.compile(r"(v\d+[a-z]*):(\d+(?:x\d+){1,2})")


def topology(name: str) -> Topology:
    """Compile-only devices of a TPU slice: `v5e:1x1`, `v5e:2x2`, `v6e:2x4`, `v5p:2x2x1`, `v4:2x2x1` ...

    Slices smaller than a host (`v5e:1x1`, `v5e:2x1`) need `chips_per_host_bounds` no larger than themselves
    (docs/tpu.md §1); that is handled here."""
    text = str(name).strip().lower()
    m = _TOPOLOGY_RE.fullmatch(text)
    if m is None:
        raise AOTError(f"topology {name!r} is not of the form GENERATION:SHAPE, e.g. 'v5e:1x1', 'v5e:2x2', 'v6e:2x4', "
                       f"'v5p:2x2x2'; generations: {', '.join(CHIPS)}")
    kind, shape = m.groups()
    kind = ALIASES.get(kind, kind)
    if kind not in CHIPS:
        raise AOTError(f"topology {name!r}: unknown TPU generation {kind!r}; known: {', '.join(CHIPS)}")
    dims = tuple(int(d) for d in shape.split("x"))
    if min(dims) < 1:
        raise AOTError(f"topology {name!r}: every dimension must be >= 1")
    topologies = _require_tpu()
    canonical = f"{kind}:{shape}"
    padded = dims + (1,) * (3 - len(dims))
    bounds = tuple(min(d, b) for d, b in zip(padded, DEFAULT_HOST_BOUNDS))
    tries = [{}] if bounds == DEFAULT_HOST_BOUNDS else [{"chips_per_host_bounds": bounds}, {}]
    error = None
    for kwargs in tries:
        try:
            desc = topologies.get_topology_desc(topology_name=canonical, platform="tpu", **kwargs)
            return Topology(canonical, CHIPS[kind], tuple(desc.devices), int(np.prod(dims)))
        except Exception as e:  # libtpu raises its own runtime error type
            error = e
    raise AOTError(f"topology {name!r}: libtpu cannot describe this slice ({str(error).splitlines()[0][:300]}); "
                   "check the shape (e.g. v5e:2x2, v5p:2x2x2)")


def parse_mesh(spec, num_devices: int) -> tuple[int, int]:
    """`(data, model)` from `"data=1,model=4"`, a dict, a `(data, model)` pair or None (all devices on `model`)."""
    if spec is None:
        return 1, num_devices
    if isinstance(spec, Mesh):
        return int(spec.shape.get(sharding.DATA, 1)), int(spec.shape.get(sharding.MODEL, 1))
    if isinstance(spec, str):
        parts = {}
        for item in spec.split(","):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in (sharding.DATA, sharding.MODEL) or not value.strip().isdigit():
                raise AOTError(f"mesh {spec!r}: expected 'data=D,model=M' (positive integers), e.g. 'data=1,model=4'")
            parts[key] = int(value)
        spec = parts
    if isinstance(spec, Mapping):
        unknown = set(spec) - {sharding.DATA, sharding.MODEL}
        if unknown:
            raise AOTError(f"mesh {dict(spec)}: unknown axes {sorted(unknown)}; the library's mesh is data x model")
        model = int(spec.get(sharding.MODEL, 0)) or None
        data = int(spec.get(sharding.DATA, 0)) or None
        if model is None and data is None:
            return 1, num_devices
        if model is None:
            model = num_devices // data if data and num_devices % data == 0 else 0
        if data is None:
            data = num_devices // model if num_devices % model == 0 else 0
    else:
        try:
            data, model = (int(x) for x in spec)
        except (TypeError, ValueError):
            raise AOTError(f"mesh {spec!r}: pass 'data=D,model=M', a dict or a (data, model) pair") from None
    if data < 1 or model < 1 or data * model != num_devices:
        raise AOTError(f"mesh {spec!r}: data x model must equal the slice's {num_devices} devices "
                       f"(e.g. 'data=1,model={num_devices}')")
    return data, model


def make_mesh(topo: Topology | str, mesh=None) -> Mesh:
    """A `data x model` mesh over a topology's devices (default: every device on `model`)."""
    topo = topology(topo) if isinstance(topo, str) else topo
    data, model = parse_mesh(mesh, len(topo.devices))
    return Mesh(np.asarray(topo.devices, dtype=object).reshape(data, model), (sharding.DATA, sharding.MODEL))


# ----------------------------------------------------------------------------------------------- configs

def _config_file(value, what: str) -> Path:
    """A config.json path for a file, a directory or a hub id (only its config.json is fetched)."""
    path = Path(str(value))
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{what} {value!r}: the directory has no config.json")
        return path / "config.json"
    from dspark_jax.models.loading import is_hub_id

    if not is_hub_id(str(value)):
        raise ConfigError(f"{what} {value!r} is neither a config.json, a directory holding one, nor a hub id owner/name")
    repo_id, _, revision = str(value).partition("@")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise HubError(f"{what} {value!r}: not a local file; reading a hub config needs huggingface_hub "
                       "(pip install huggingface_hub), or pass a config.json path") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        return Path(hf_hub_download(repo_id, "config.json", revision=revision or None, local_files_only=offline))
    except Exception as e:  # offline, no such repo, gated, network down: all mean "give me a file"
        raise HubError(f"{what} {value!r}: cannot read its config.json from the hub ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200]}); download config.json once and pass its path") from None


def target_config(value):
    """A target config from a config object, a config.json path, a directory or a hub id."""
    if not isinstance(value, (str, os.PathLike)):
        from dspark_jax.models import registry

        registry.by_config(value)  # ConfigError for a non-target config
        return value
    from dspark_jax.models.loading import parse_target_config

    return parse_target_config(_config_file(value, "target config"))


def draft_config(value, target=None, K: int | None = None):
    """A draft config from a config object, a path/directory or a hub id: DSpark / DFlash, EAGLE-3, or the MTP /
    DSpark module of a DeepSeek-V3 / -V4 target config (`K`: chained MTP depth)."""
    if value is None or not isinstance(value, (str, os.PathLike)):
        return value
    from dspark_jax.config import read_json

    path = _config_file(value, "draft config")
    raw = read_json(path)
    if raw.get("model_type") in ("deepseek_v3", "deepseek_v4") and "architectures" not in raw or \
            raw.get("model_type") in ("deepseek_v3", "deepseek_v4") and "DSpark" not in str(raw.get("architectures")):
        return _mtp_config(raw, path, K)
    archs = raw.get("architectures") or []
    if archs and "Eagle3" in str(archs[0]):
        from dspark_jax.proposers.eagle3_checkpoint import parse_draft_config as parse_eagle3

        return parse_eagle3(path)
    from dspark_jax.proposers.dspark_checkpoint import parse_draft_config

    return parse_draft_config(path)


def _mtp_config(raw: dict, path: Path, K: int | None):
    where = str(path)
    depth = int(K or 1)
    if raw.get("model_type") == "deepseek_v4":
        from dspark_jax.models.deepseek_v4.checkpoint import parse_config as parse_v4

        if any(k.startswith("dspark_") for k in raw):
            from dspark_jax.proposers.dspark_v4 import config_from

            return config_from(raw, where, set(), None)
        from dspark_jax.proposers.mtp_v4 import V4MTPConfig

        return V4MTPConfig(target=parse_v4(raw, where), max_draft_length=depth)
    from dspark_jax.models.deepseek_v3.checkpoint import parse_config as parse_v3
    from dspark_jax.proposers.mtp import MTPConfig

    target = parse_v3(raw, where)
    if target.num_mtp_layers < 1:
        raise ConfigError(f"{where}: num_nextn_predict_layers is 0: this DeepSeek-V3 config has no MTP module")
    return MTPConfig(target=target, layer=target.num_layers, max_draft_length=depth)


def draft_class(config):
    """The proposer module class built from a draft config."""
    from dspark_jax.proposers.dspark import DraftConfig, DSparkDraft
    from dspark_jax.proposers.dspark_v4 import V4DSparkConfig, V4DSparkDraft
    from dspark_jax.proposers.eagle3 import Eagle3Config, Eagle3Draft
    from dspark_jax.proposers.mtp import MTPConfig, MTPProposer
    from dspark_jax.proposers.mtp_v4 import V4MTPConfig, V4MTPProposer

    classes = {DraftConfig: DSparkDraft, V4DSparkConfig: V4DSparkDraft, Eagle3Config: Eagle3Draft,
               MTPConfig: MTPProposer, V4MTPConfig: V4MTPProposer}
    for cls, module in classes.items():
        if isinstance(config, cls):
            return module
    raise ConfigError(f"draft config of type {type(config).__name__} is not a trained draft's config "
                      f"(expected one of {', '.join(c.__name__ for c in classes)})")


# ------------------------------------------------------------------------------------------ abstract trees

def _placed(shape, dtype, axes, mesh) -> jax.ShapeDtypeStruct:
    spec = sharding.partition_spec(tuple(shape), axes, mesh) if axes is not None else PartitionSpec()
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(mesh, spec))


def abstract_params(module_class, config, dtype, mesh: Mesh):
    """(graphdef, parameters as `ShapeDtypeStruct`s placed by their logical axes): nothing is allocated."""
    from dspark_jax.layers.params import Init

    graphdef, state = nnx.split(nnx.eval_shape(lambda: module_class(config, Init(nnx.Rngs(0), jnp.dtype(dtype)))))

    def place(var):
        value = var.get_value()
        return var.replace(_placed(value.shape, value.dtype, var.get_metadata().get("axes"), mesh))

    return graphdef, jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _batch_axes(init, batch: int):
    """The batch axis of every leaf of `init(b)` (the one whose size follows `b`), found from two abstract calls."""
    a = jax.eval_shape(lambda: init(batch))
    b = jax.eval_shape(lambda: init(batch + 1))
    return jax.tree.map(lambda x, y: next((i for i, (p, q) in enumerate(zip(x.shape, y.shape)) if p != q), None), a, b)


def _cache_axes(shape, batch_axis) -> tuple | None:
    from dspark_jax.layers import kv_cache as kv

    if len(shape) == len(kv.CACHE_AXES) and batch_axis == kv.CACHE_AXES.index("batch"):
        return kv.CACHE_AXES
    if batch_axis is None:
        return None
    return tuple("batch" if i == batch_axis else None for i in range(len(shape)))


def place_state(tree, mesh: Mesh, cache_axes: dict | None = None):
    """Every leaf of an abstract engine state as a placed `ShapeDtypeStruct`: caches by `kv_cache.CACHE_AXES`, other
    per-row arrays over `data` on their leading axis, scalars replicated. `cache_axes`: id(leaf) -> axes."""
    cache_axes = cache_axes or {}

    def one(x):
        axes = cache_axes.get(id(x))
        if axes is None and x.ndim:
            axes = ("batch",) + (None,) * (x.ndim - 1)
        return _placed(x.shape, x.dtype, axes, mesh)

    return jax.tree.map(one, tree)


def _cache_placement(tree, init, batch: int) -> dict:
    """id(leaf) -> logical axes for the leaves of a cache tree built by `init(batch)`."""
    axes = _batch_axes(init, batch)
    return {id(x): _cache_axes(x.shape, a) for x, a in zip(jax.tree.leaves(tree), jax.tree.leaves(axes))}


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of placed `ShapeDtypeStruct`s."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * _itemsize(x.dtype)
    return total


def _itemsize(dtype) -> int:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return 8
    return jnp.dtype(dtype).itemsize


# ------------------------------------------------------------------------------------------------- programs

PROGRAMS = ("ar_step", "spec_round", "spec_round_auto", "ar_loop", "spec_loop", "spec_loop_auto", "continuous",
            "train_step")
NEEDS_DRAFT = ("spec_round", "spec_round_auto", "spec_loop", "spec_loop_auto", "train_step")


@dataclasses.dataclass
class AOTProgram:
    """One program compiled (or refused for memory) for a TPU slice. Byte figures are per device."""

    program: str
    topology: Topology
    mesh: dict
    batch: int
    capacity: int
    dtype: str
    K: int
    compiled: Any  # jax.stages.Compiled, None when out of memory
    fits: bool
    param_bytes: int  # weights (target + draft) per device
    cache_bytes: int  # the target's and the proposer's caches per device
    cache_copy_bytes: int  # the smallest whole target cache array per device: the copy counter's threshold
    state_bytes: int  # every argument besides the weights (caches included)
    lower_s: float
    compile_s: float
    oom_message: str = ""
    notes: tuple[str, ...] = ()

    @property
    def hlo(self) -> str:
        return "" if self.compiled is None else self.compiled.as_text()

    def memory(self) -> dict:
        """XLA's per-device memory analysis (bytes), or the figures of the out-of-memory error."""
        if self.compiled is None:
            return {"oom": self.oom_message}
        m = self.compiled.memory_analysis()
        return {"arguments": int(m.argument_size_in_bytes), "temporaries": int(m.temp_size_in_bytes),
                "outputs": int(m.output_size_in_bytes), "aliases": int(m.alias_size_in_bytes),
                "generated_code": int(m.generated_code_size_in_bytes)}


def _requests(target_cfg, batch: int, prompt_len: int, max_new: int, mesh: Mesh, rows: int | None = None):
    """Abstract `Requests` of `rows` (default `batch`) prompts of `prompt_len` tokens, placed over `data`."""
    from dspark_jax.engine import generation
    from dspark_jax.handles import Target

    rows = rows or batch
    stub = Target(config=target_cfg, graphdef=None, params={"x": np.zeros(1)}, dtype=jnp.float32)
    req, _, shapes = generation.build_requests(
        stub, [[1] * prompt_len] * rows, max_new_tokens=max_new, temperature=0.0, top_k=0, top_p=1.0, seed=0,
        stop_token_ids=[], confidence_threshold=0.0)
    return place_state(jax.eval_shape(lambda: req), mesh), shapes


def _schedule(K: int, mesh: Mesh):
    from dspark_jax.engine import schedule as sched

    verify, draft_cost = sched.constant_costs(K)
    params = sched.ScheduleParams(jnp.asarray(verify), jnp.asarray(draft_cost, jnp.float32), jnp.ones((K,), jnp.float32),
                                  jnp.full((K,), sched.DEFAULT_PRIOR, jnp.float32))
    return jax.tree.map(lambda x: _placed(x.shape, x.dtype, None, mesh), jax.eval_shape(lambda: params))


def _check_args(program, draft_cfg, batch, capacity, K):
    if program not in PROGRAMS:
        raise AOTError(f"program {program!r} is not one of {', '.join(PROGRAMS)}")
    if program in NEEDS_DRAFT and draft_cfg is None:
        raise AOTError(f"program {program!r} needs a draft config")
    for name, value in (("batch", batch), ("capacity", capacity)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise AOTError(f"{name}={value!r} must be a positive integer")
    if K is not None and (isinstance(K, bool) or not isinstance(K, (int, np.integer)) or K < 1):
        raise AOTError(f"K={K!r} must be a positive integer (draft tokens per round)")


def compile(target_config_or_path, draft_config_or_path, program: str, *, topology: str | Topology, mesh=None,
            batch: int, capacity: int, dtype="bfloat16", K: int | None = None, prompt_len: int | None = None,
            slots_queue: int = 2) -> AOTProgram:  # noqa: A001 - the module's verb
    """Compile `program` of the library for `topology` on a `data x model` `mesh` from configs alone.

    `capacity`: cache positions per row; `batch`: rows (slots for `continuous`, sequences for `train_step`, whose
    sequence length is `capacity`); `K`: draft tokens per round (default: the draft's block size / depth).
    `prompt_len`: the prompt block of the loop programs (default min(512, capacity / 4)). Nothing is allocated
    and no TPU is needed (libtpu is)."""
    from dspark_jax.models.loading import check_dtype

    topo = globals()["topology"](topology) if isinstance(topology, str) else topology
    dt = check_dtype(dtype)
    tcfg = target_config(target_config_or_path)
    dcfg = draft_config(draft_config_or_path, tcfg, K)
    _check_args(program, dcfg, batch, capacity, K)
    mesh_ = make_mesh(topo, mesh)
    return _compile(tcfg, dcfg, program, topo, mesh_, int(batch), int(capacity), dt, K, prompt_len, slots_queue)


def _compile(tcfg, dcfg, program, topo, mesh, batch, capacity, dt, K, prompt_len, slots_queue) -> AOTProgram:
    from dspark_jax.models import registry

    family = registry.by_config(tcfg)
    tg, tp = abstract_params(family.model_class, tcfg, dt, mesh)
    pg = pp = None
    if dcfg is not None:
        pg, pp = abstract_params(draft_class(dcfg), dcfg, dt, mesh)
        proposer = nnx.merge(pg, jax.tree.map(lambda x: x, pp))
        K = int(K or proposer.max_draft_length)
        if K > proposer.max_draft_length:
            raise AOTError(f"K={K} exceeds the draft's maximum of {proposer.max_draft_length} tokens per round")
    K = int(K or 0)
    from dspark_jax.engine.generation import bucket

    notes: list[str] = []
    if bucket(batch) != batch:  # the engine pads a batch to a power of two (`generation.build_requests`)
        notes.append(f"batch {batch} runs padded to {bucket(batch)} rows, as the engine pads it")
        batch = bucket(batch)
    target = nnx.merge(tg, tp)
    P = int(prompt_len or min(512, max(16, capacity // 4)))
    if P + K + 2 > capacity:
        raise AOTError(f"capacity={capacity} is too small: a {P}-token prompt and a round of {K + 1} tokens need "
                       f"{P + K + 2} positions")
    max_new = capacity - P - K - 1
    t0 = time.perf_counter()
    # host arrays are made before the mesh is entered: under `jax.set_mesh` they would go to compile-only devices
    # (docs/tpu.md §1)
    req, shapes = _requests(tcfg, batch, P, max_new, mesh, rows=batch * slots_queue if program == "continuous" else None)
    schedule = _schedule(K, mesh) if program.endswith("_auto") else None
    with jax.set_mesh(mesh):  # the engine's constraints place caches and activations on this mesh
        lowered, cache_tree, threshold_tree = _lower(program, tg, tp, pg, pp, target, tcfg, dcfg, dt, req, shapes, schedule,
                                                     batch, capacity, K, P, mesh, notes)
    lower_s = time.perf_counter() - t0
    return _finish(lowered, program, topo, mesh, batch, capacity, dt, K, tp, pp, cache_tree, threshold_tree, lower_s,
                   notes)


def _lower(program, tg, tp, pg, pp, target, tcfg, dcfg, dt, req, shapes, schedule, batch, capacity, K, P, mesh, notes):
    from dspark_jax.engine import continuous, decode, spec

    cache_tree = None

    if program in ("ar_step", "spec_round", "spec_round_auto"):
        out_len = shapes["out_len"]
        if program == "ar_step":
            init = lambda b: target.init_cache(b, capacity, max_block=1)  # noqa: E731
            state = jax.eval_shape(lambda r: decode.begin(init(batch), r.prompt_lens, r, out_len), req)
            placement = _cache_placement(state.cache, init, batch)
            state = place_state(state, mesh, placement)
            cache_tree = threshold_tree = state.cache
            fn, args, kwargs = decode.step_jit, (tg, tp, state), {}
        else:
            proposer = nnx.merge(pg, pp)
            init_t = lambda b: target.init_cache(b, capacity, max_block=K + 1)  # noqa: E731
            init_p = lambda b: proposer.init_state(b, capacity)  # noqa: E731
            state = jax.eval_shape(lambda r: spec.begin(init_t(batch), init_p(batch), r.prompt_lens, r, out_len), req)
            placement = _cache_placement(state.target_cache, init_t, batch) | _cache_placement(state.proposer_state, init_p, batch)
            state = place_state(state, mesh, placement)
            cache_tree, threshold_tree = (state.target_cache, state.proposer_state), state.target_cache
            kwargs = {"K": K, "capacity": capacity}
            if program.endswith("_auto"):
                kwargs["schedule"] = schedule
            fn, args = spec.spec_step, (tg, tp, pg, pp, state)
        lowered = fn.lower(*args, **kwargs)
    elif program in ("ar_loop", "spec_loop", "spec_loop_auto"):
        statics = {"capacity": capacity, "out_len": shapes["out_len"], "chunk": min(shapes["chunk"], P)}
        if program == "ar_loop":
            lowered = decode.generate_loop.lower(tg, tp, req, **statics)
            init = lambda b: target.init_cache(b, capacity, max_block=1)  # noqa: E731
        else:
            extra = {"schedule": schedule} if program.endswith("_auto") else {}
            lowered = spec.generate_loop.lower(tg, tp, pg, pp, req, K=K, **statics, **extra)
            init = lambda b: target.init_cache(b, capacity, max_block=K + 1)  # noqa: E731
        threshold_tree = place_state(jax.eval_shape(lambda: init(batch)), mesh, _cache_placement(jax.eval_shape(lambda: init(batch)), init, batch))
        cache_tree = threshold_tree
        notes.append("loop programs: the while loop's trip count is unknown; its body is counted once")
    elif program == "continuous":
        queue = req
        statics = {"capacity": capacity, "out_len": shapes["out_len"], "chunk": min(shapes["chunk"], P, 256),
                   "slots": batch}
        n = _placed((), jnp.int32, None, mesh)
        if dcfg is None:
            lowered = continuous.ar_job.lower(tg, tp, queue, n, **statics)
            init = lambda b: target.init_cache(b, capacity, max_block=1)  # noqa: E731
        else:
            lowered = continuous.spec_job.lower(tg, tp, pg, pp, queue, n, None, K=K, **statics)
            init = lambda b: target.init_cache(b, capacity, max_block=K + 1)  # noqa: E731
        abstract_cache = jax.eval_shape(lambda: init(batch))
        threshold_tree = cache_tree = place_state(abstract_cache, mesh, _cache_placement(abstract_cache, init, batch))
        notes.append(f"continuous: {batch} slots over a queue of {queue.tokens.shape[0]} prompts; the loop body is counted once")
    else:  # train_step
        lowered, cache_tree = _lower_train(tcfg, dcfg, pg, pp, dt, batch, capacity, mesh)
        threshold_tree = None
        notes.append("train_step: the draft's micro-step on a batch of target features; sequence length = capacity")
    return lowered, cache_tree, threshold_tree


COMPILED_CACHE_SIZE = 8
_COMPILED: collections.OrderedDict = collections.OrderedDict()  # (topology, lowered text hash) -> (compiled, oom)


def clear_cache() -> None:
    """Forget the programs compiled in this process (`compile` keeps the last `COMPILED_CACHE_SIZE`)."""
    _COMPILED.clear()


def _finish(lowered, program, topo, mesh, batch, capacity, dt, K, tp, pp, cache_tree, threshold_tree, lower_s, notes):
    compiled, oom = None, ""
    t1 = time.perf_counter()
    key = (topo.name, hashlib.sha256(lowered.as_text().encode()).hexdigest())
    if key in _COMPILED:  # the same program for the same slice (a plan re-asking, tests): XLA would redo it all
        compiled, oom = _COMPILED[key]
        _COMPILED.move_to_end(key)
    else:
        try:
            compiled = lowered.compile(compiler_options=compiling.options("tpu"))
        except Exception as e:  # XLA:TPU reports out-of-HBM as RESOURCE_EXHAUSTED at compile time
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            oom = str(e).splitlines()[0]
        _COMPILED[key] = (compiled, oom)
        while len(_COMPILED) > COMPILED_CACHE_SIZE:
            _COMPILED.popitem(last=False)
    compile_s = time.perf_counter() - t1
    param_bytes = per_device_bytes(tp) + (per_device_bytes(pp) if pp is not None else 0)
    cache_bytes = per_device_bytes(cache_tree) if cache_tree is not None else 0
    copy_bytes = min((per_device_bytes(x) for x in jax.tree.leaves(threshold_tree) if capacity in x.shape), default=0) \
        if threshold_tree is not None else 0
    return AOTProgram(
        program=program, topology=topo, mesh=dict(mesh.shape), batch=batch, capacity=capacity, dtype=str(dt), K=K,
        compiled=compiled, fits=compiled is not None, param_bytes=param_bytes, cache_bytes=cache_bytes,
        cache_copy_bytes=copy_bytes, state_bytes=0, lower_s=lower_s, compile_s=compile_s, oom_message=oom,
        notes=tuple(notes))


def _lower_train(tcfg, dcfg, pg, pp, dt, batch, capacity, mesh):
    from dspark_jax.proposers.dspark import DraftConfig
    from dspark_jax.training import optim
    from dspark_jax.training.losses import LossWeights
    from dspark_jax.training.trainer import Batch, is_frozen, train_step

    if not isinstance(dcfg, DraftConfig):
        raise AOTError(f"train_step: training is for DSpark / DFlash drafts; got a {type(dcfg).__name__}")
    graphdef, frozen, trainable = nnx.split(nnx.merge(pg, pp), is_frozen, ...)
    # master weights in fp32, placed like the draft's parameters
    place = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype,
                                       sharding=x.sharding), tree)
    frozen, trainable = place(frozen), place(trainable)
    tx = optim.adamw(1e-4, 1000)
    opt_state = jax.eval_shape(tx.init, trainable)
    opt_state = jax.tree.map(lambda x: _placed(x.shape, x.dtype, None, mesh) if not hasattr(x, "sharding") or x.sharding is None
                             else x, opt_state)
    F = len(dcfg.target_layer_ids) * tcfg.hidden_size
    D = tcfg.hidden_size
    S = capacity
    row = lambda shape, dtype: _placed(shape, dtype, ("batch",) + (None,) * (len(shape) - 1), mesh)  # noqa: E731
    batch_ = Batch(input_ids=row((batch, S), jnp.int32), loss_mask=row((batch, S), jnp.uint8),
                   lengths=row((batch,), jnp.int32), features=row((batch, S, F), dt), last_hidden=row((batch, S, D), dt))
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = _placed(key.shape, key.dtype, None, mesh)
    lowered = train_step.lower(graphdef, frozen, trainable, opt_state, batch_, key, tx=tx, num_anchors=dcfg.num_anchors,
                               weights=LossWeights(), chunk_blocks=64, dtype=dt)
    return lowered, None


# --------------------------------------------------------------------------------------------------- HLO

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 1, "u4": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1,
                "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
                "c64": 8, "c128": 16, "token": 0, "tuple": 0}
_SHAPE_RE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_INSTR_RE = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_COMP_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    opcode: str
    type_text: str
    rest: str
    computation: str
    root: bool = False

    @property
    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _SHAPE_RE.findall(self.type_text)]

    @property
    def bytes(self) -> int:
        """Bytes of the instruction's result; a tuple result (copy-start) counts its largest element."""
        sizes = [int(np.prod(s, dtype=np.int64)) * _DTYPE_BYTES.get(d, 4) for d, s in self.shapes]
        return max(sizes, default=0) if self.type_text.startswith("(") else sum(sizes)

    def attribute(self, key: str) -> str | None:
        m = re.search(rf"\b{key}=(%?[\w.\-]+|\{{[^}}]*\}})", self.rest)
        return m.group(1) if m else None


def parse_hlo(text: str) -> tuple[dict[str, list[Instruction]], str | None]:
    """(computation name -> instructions, entry computation name) of an HLO module's text."""
    comps: dict[str, list[Instruction]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            m = _COMP_RE.match(line)
            if m:
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR_RE.match(line)
        if m:
            comps[current].append(Instruction(m.group(2), m.group(4), m.group(3), m.group(5), current, bool(m.group(1))))
    return comps, entry


def _hlo_text(compiled_or_text) -> str:
    if isinstance(compiled_or_text, str):
        return compiled_or_text
    if isinstance(compiled_or_text, AOTProgram):
        return compiled_or_text.hlo
    return compiled_or_text.as_text()


COPY_OPCODES = ("copy", "copy-start")


def whole_cache_copies(compiled_or_text, min_bytes: int) -> list[Instruction]:
    """`copy` / `copy-start` instructions (in any computation, fused ones included) whose result holds at least
    `min_bytes` bytes: in a program carrying KV caches, with `min_bytes` the smallest stacked cache array's size (per
    device after SPMD partitioning), each is a copy of a whole cache. Works on any compiled program's HLO (TPU or
    CPU), an `AOTProgram`, or the text itself."""
    if min_bytes <= 0:
        raise AOTError(f"min_bytes={min_bytes}: pass the size of one stacked cache array in bytes (> 0)")
    comps, _ = parse_hlo(_hlo_text(compiled_or_text))
    return [i for instrs in comps.values() for i in instrs if i.opcode in COPY_OPCODES and i.bytes >= min_bytes]


def cache_array_bytes(cache, per_device: bool = True) -> int:
    """The smallest array of a cache tree in bytes (per device when the leaves are placed): `whole_cache_copies`'
    threshold."""
    sizes = []
    for x in jax.tree.leaves(cache):
        shape = x.sharding.shard_shape(x.shape) if per_device and getattr(x, "sharding", None) is not None and \
            hasattr(x.sharding, "shard_shape") else x.shape
        sizes.append(int(np.prod(shape, dtype=np.int64)) * _itemsize(x.dtype))
    return min(sizes, default=0)


_BAD_TYPES = ("f64", "s64", "u64", "c128")
HOST_OPCODES = ("infeed", "outfeed", "send", "send-done", "recv", "recv-done")


def wide_types(compiled_or_text) -> list[Instruction]:
    """Instructions producing 64-bit values (f64 / s64 / u64 / c128)."""
    comps, _ = parse_hlo(_hlo_text(compiled_or_text))
    return [i for instrs in comps.values() for i in instrs if any(d in _BAD_TYPES for d, _ in i.shapes)]


def host_transfers(compiled_or_text) -> list[Instruction]:
    """Infeed / outfeed / send / recv, host callbacks and custom calls that reach the host."""
    comps, _ = parse_hlo(_hlo_text(compiled_or_text))
    out = []
    for instrs in comps.values():
        for i in instrs:
            if i.opcode in HOST_OPCODES:
                out.append(i)
            elif i.opcode == "custom-call":
                target = (i.attribute("custom_call_target") or "").lower()
                if "host" in target or "callback" in target or "python" in target:
                    out.append(i)
    return out


# ------------------------------------------------------------------------------------------- cycle estimate

_CYCLES_RE = re.compile(r'"estimated_cycles"\s*:\s*"?(\d+)"?')
_TRIP_RE = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)"?')
_CONST_RE = re.compile(r"^(-?\d+)\)")


def trip_count(comps: dict[str, list[Instruction]], loop: Instruction) -> int | None:
    """A while loop's trip count: XLA's `known_trip_count` when present, else read from its condition when that is
    `counter < constant` (a `lax.scan` / `fori_loop` with static bounds from 0; docs/tpu.md §3); None if unknown."""
    m = _TRIP_RE.search(loop.rest)
    if m:
        return int(m.group(1))
    cond = (loop.attribute("condition") or "").lstrip("%")
    instrs = comps.get(cond, [])
    root = next((i for i in instrs if i.root), None)
    if root is None or root.opcode != "compare" or "direction=LT" not in root.rest:
        return None
    operands = re.findall(r"%([\w.\-]+)", root.rest.split(")", 1)[0])
    consts = {i.name: i for i in instrs if i.opcode == "constant" and re.fullmatch(r"s32\[\]", i.type_text.split("{")[0])}
    if len(operands) != 2 or operands[1] not in consts:
        return None
    c = _CONST_RE.match(consts[operands[1]].rest)
    return int(c.group(1)) if c else None


@dataclasses.dataclass
class CycleEstimate:
    """`estimated_cycles` summed over the program as it executes (docs/tpu.md §3).

    `low` takes each conditional's cheapest branch, `high` its costliest; a while loop with a known trip count
    counts its body that many times; attention's key-block loop, given `used_extent`, the trips that extent takes
    (`key_block_trips`); any other loop without a known count counts once (`unknown_loops`). `copy_cycles`: the part spent in
    copies of at least the copy threshold (whole-cache copies). With `bytes_per_cycle`, a copy XLA gives no estimate
    is charged its bytes read and written at that rate."""

    low: float
    high: float
    copy_cycles_low: float
    copy_cycles_high: float
    unknown_loops: int
    instructions_without_estimate: int
    copy_executions: int = 0  # whole-cache copies executed per run (high estimate; loop bodies x trip counts)


_KEY_BLOCKS_RE = re.compile(r"key_blocks_S(\d+)_C(\d+)")


def key_block_trips(loop: Instruction, used_extent: int | None) -> int | None:
    """Trips of attention's streamed key-block loop (`layers.attention`, named `key_blocks_S{size}_C{block}`) when
    the rows use `used_extent` positions: `ceil(min(used_extent, size) / block)`; None for any other loop or
    without an extent."""
    m = _KEY_BLOCKS_RE.search(loop.rest)
    if m is None or used_extent is None:
        return None
    size, block = int(m.group(1)), int(m.group(2))
    return max(1, -(-min(int(used_extent), size) // block))


def estimate_cycles(compiled_or_text, copy_min_bytes: int = 0, bytes_per_cycle: float | None = None,
                    used_extent: int | None = None) -> CycleEstimate:
    comps, entry = parse_hlo(_hlo_text(compiled_or_text))
    memo: dict[str, np.ndarray] = {}
    stats = {"unknown": 0, "missing": 0}

    def own(i: Instruction) -> float:
        m = _CYCLES_RE.search(i.rest)
        if m is None and bytes_per_cycle and i.opcode in COPY_OPCODES:  # XLA gives some copies no estimate: read + write
            return 2.0 * i.bytes / bytes_per_cycle
        if m is None:
            if i.opcode not in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
                                "call", "after-all", "partition-id", "replica-id"):
                stats["missing"] += 1
            return 0.0
        return float(m.group(1))

    def called(i: Instruction, key: str) -> list[str]:
        v = i.attribute(key)
        if v is None:
            return []
        return [x.strip().lstrip("%") for x in v.strip("{}").split(",") if x.strip()]

    def big_copy(i: Instruction) -> bool:
        if copy_min_bytes <= 0:
            return False
        if i.opcode in COPY_OPCODES + ("copy-done",):
            return i.bytes >= copy_min_bytes
        if i.opcode == "fusion":  # a fusion whose computation copies a cache-sized buffer
            return any(j.opcode == "copy" and j.bytes >= copy_min_bytes for x in called(i, "calls")
                       for j in comps.get(x, []))
        return False

    def cost(name: str) -> np.ndarray:
        """[low, high, copy low, copy high, copy executions (high)] of one run of computation `name`."""
        if name in memo:
            return memo[name]
        memo[name] = np.zeros(5)  # a recursive call (none expected) is cut
        total = np.zeros(5)
        for i in comps.get(name, []):
            c = own(i)
            total += (c, c, 0, 0, 0)
            if big_copy(i):
                total += (0, 0, c, c, i.opcode != "copy-done")
            if i.opcode == "while":
                trips = trip_count(comps, i)
                if trips is None:
                    trips = key_block_trips(i, used_extent)
                if trips is None:
                    stats["unknown"] += 1
                    trips = 1
                total += trips * sum((cost(x) for x in called(i, "body") + called(i, "condition")), np.zeros(5))
            elif i.opcode == "conditional":
                names = called(i, "branch_computations") or called(i, "true_computation") + called(i, "false_computation")
                parts = [cost(x) for x in names]
                if parts:
                    cheap = min(parts, key=lambda p: p[0])
                    dear = max(parts, key=lambda p: p[1])
                    total += (cheap[0], dear[1], cheap[2], dear[3], dear[4])
            elif i.opcode in ("call", "async-start") or i.opcode.endswith("-start") and i.attribute("calls"):
                for x in called(i, "to_apply") + called(i, "calls"):
                    total += cost(x)
        memo[name] = total
        return total

    if entry is None:
        raise AOTError("no ENTRY computation in the HLO text")
    lo, hi, clo, chi, executions = (float(x) for x in cost(entry))
    return CycleEstimate(lo, hi, clo, chi, stats["unknown"], stats["missing"], int(executions))


# ------------------------------------------------------------------------------------------------- report

@dataclasses.dataclass
class Report:
    """What `report` found for one program (bytes per device; times in seconds)."""

    program: str
    topology: str
    mesh: dict
    batch: int
    capacity: int
    dtype: str
    K: int
    fits: bool
    hbm_bytes: float  # usable HBM per device
    memory: dict
    param_bytes: int
    cache_bytes: int
    whole_cache_copies: int
    copy_shapes: list[str]
    roofline_s: float  # (a): weights + KV at the used extent, over HBM bandwidth
    xla_estimate_s: tuple[float, float] | None  # (b): XLA:TPU's cycles, (cheapest, costliest conditional branches)
    copy_estimate_s: tuple[float, float] | None  # of (b), the whole-cache copies
    copy_executions: int  # whole-cache copies executed per run (loop bodies x trip counts)
    used_extent: int
    compile_s: float
    notes: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int | None:
        m = self.memory
        if "arguments" not in m:
            return None
        return m["arguments"] + m["temporaries"] + m["outputs"] - m["aliases"]

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"total_bytes": self.total_bytes}

    def summary(self) -> str:
        gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
        lines = [f"{self.program} on {self.topology} (mesh {self.mesh}), batch {self.batch}, cache {self.capacity}, "
                 f"{self.dtype}" + (f", K={self.K}" if self.K else "")]
        if self.total_bytes is not None:
            m = self.memory
            lines.append(f"  per chip: arguments {gib(m['arguments'])} (weights {gib(self.param_bytes)}, caches "
                         f"{gib(self.cache_bytes)}), temporaries {gib(m['temporaries'])}, outputs {gib(m['outputs'])}, "
                         f"aliased {gib(m['aliases'])}; total {gib(self.total_bytes)} of {gib(self.hbm_bytes)}: "
                         f"{'fits' if self.fits else 'does not fit'}")
        else:
            lines.append(f"  does not fit: {self.memory.get('oom', '')}")
        if self.xla_estimate_s is not None:  # compiled
            lines.append(f"  whole-cache copies in the optimized HLO: {self.whole_cache_copies} instructions, "
                         f"{self.copy_executions} executions per run"
                         + (f" ({', '.join(sorted(set(self.copy_shapes)))})" if self.copy_shapes else ""))
        lines.append(f"  roofline (weights + KV to {self.used_extent} positions / HBM bandwidth): "
                     f"{1e3 * self.roofline_s:.2f} ms")
        if self.xla_estimate_s is not None:
            lo, hi = self.xla_estimate_s
            clo, chi = self.copy_estimate_s
            lines.append(f"  XLA:TPU cycle estimate: {1e3 * lo:.2f}-{1e3 * hi:.2f} ms (of which whole-cache copies "
                         f"{1e3 * clo:.2f}-{1e3 * chi:.2f} ms); roofline / estimate {self.roofline_s / hi:.0%}-"
                         f"{self.roofline_s / max(lo, 1e-12):.0%}")
        return "\n".join(lines)


def report(program: AOTProgram | None = None, *args, used_extent: int | None = None, **kwargs) -> Report:
    """A `Report` of an `AOTProgram` (or of `compile(*args, **kwargs)`). `used_extent`: cache positions a step
    reads per row for the roofline (default: half the capacity)."""
    if program is None or not isinstance(program, AOTProgram):
        program = compile(*((program,) if program is not None else ()), *args, **kwargs)
    p = program
    extent = int(used_extent or max(1, p.capacity // 2))
    kv_read = p.cache_bytes * min(1.0, extent / p.capacity)
    roofline = (p.param_bytes + kv_read) / p.topology.device_bandwidth
    copies: list[Instruction] = []
    est = cp = None
    executions = 0
    if p.compiled is not None:
        text = p.hlo
        if p.cache_copy_bytes:
            copies = whole_cache_copies(text, p.cache_copy_bytes)
        hz = p.topology.chip.clock_hz
        c = estimate_cycles(text, p.cache_copy_bytes, p.topology.device_bandwidth / hz, used_extent=extent)
        est, cp = (c.low / hz, c.high / hz), (c.copy_cycles_low / hz, c.copy_cycles_high / hz)
        executions = c.copy_executions
    hbm = p.topology.device_hbm_bytes
    m = _oom_hbm(p.oom_message)
    if m:
        hbm = m
    return Report(
        program=p.program, topology=p.topology.name, mesh=p.mesh, batch=p.batch, capacity=p.capacity, dtype=p.dtype,
        K=p.K, fits=p.fits, hbm_bytes=hbm, memory=p.memory(), param_bytes=p.param_bytes, cache_bytes=p.cache_bytes,
        whole_cache_copies=len(copies), copy_shapes=[i.type_text.split("{")[0].strip("(") for i in copies],
        roofline_s=roofline, xla_estimate_s=est, copy_estimate_s=cp, copy_executions=executions, used_extent=extent, compile_s=p.compile_s,
        notes=p.notes)


_OOM_RE = re.compile(r"exceeds available HBM \(([\d.]+)([KMGT])\)")


def _oom_hbm(message: str) -> float | None:
    m = _OOM_RE.search(message or "")
    if not m:
        return None
    return float(m.group(1)) * {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2)]


def versions() -> dict:
    """jax / jaxlib / libtpu versions (for reports)."""
    out = {"jax": jax.__version__}
    try:
        import jaxlib

        out["jaxlib"] = jaxlib.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        from importlib.metadata import version

        out["libtpu"] = version("libtpu")
    except Exception:  # pragma: no cover - not installed
        out["libtpu"] = None
    return out


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o))


__all__ = ["AOTError", "AOTProgram", "CHIPS", "Chip", "CycleEstimate", "PROGRAMS", "Report", "Topology",
           "cache_array_bytes", "clear_cache", "compile", "draft_config", "estimate_cycles", "host_transfers", "make_mesh",
           "parse_hlo", "parse_mesh", "report", "target_config", "topology", "versions", "whole_cache_copies",
           "wide_types"]
