"""Table-driven, strict checkpoint -> NNX parameter conversion.

A key map is a list of `(hf_key_template, [(path_template, kind), ...])`, e.g.
`("model.layers.{i}.self_attn.q_proj.weight", [(("layers", "{i}", "self_attn", "q_proj"), "linear")])`;
`{name}` stands for an integer, and a `("stack", "e")` entry in a path marks a per-expert slice. Each
checkpoint tensor must match exactly one rule; every produced parameter path must exist in the abstract model and be set exactly once; the
source shape is derived from the destination shape and the transform kind and asserted before any data is
moved. Tensors stream one at a time from disk, are cast to the model dtype and placed on device (sharded
when a mesh is given). Per-expert tensors are stacked into one host buffer per parameter and placed when
complete.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from dspark_jax.errors import CheckpointError
from dspark_jax.sharding import partition_spec

# kind -> (expected source shape from destination shape, transform source -> destination)
#   copy:        same shape
#   linear:      PyTorch [out, in] -> [in, *out_dims]
#   linear_in:   PyTorch [out, in] -> [*in_dims, out]
#   reshape:     same elements, new shape (biases)
#   experts:     [E, out, in] -> [E, in, out]
#   fused_gate / fused_up: [E, 2F, in] (gate half first) -> [E, in, F]
KINDS: dict[str, tuple[Callable, Callable]] = {
    "copy": (lambda d: d, lambda a, d: a),
    "linear": (lambda d: (math.prod(d[1:]), d[0]), lambda a, d: a.T.reshape(d)),
    "linear_in": (lambda d: (d[-1], math.prod(d[:-1])), lambda a, d: a.T.reshape(d)),
    "reshape": (lambda d: (math.prod(d),), lambda a, d: a.reshape(d)),
    "experts": (lambda d: (d[0], d[2], d[1]), lambda a, d: a.transpose(0, 2, 1)),
    "fused_gate": (lambda d: (d[0], 2 * d[2], d[1]), lambda a, d: a[:, : d[2]].transpose(0, 2, 1)),
    "fused_up": (lambda d: (d[0], 2 * d[2], d[1]), lambda a, d: a[:, d[2] :].transpose(0, 2, 1)),
}

Rule = tuple[str, list[tuple[tuple, str]]]


def attention_rules(layer: str, at: tuple, *, bias: bool) -> list[Rule]:
    """q/k/v/o projections and q/k norms of an attention block; `layer` is the key prefix template (ending in
    `.`), `at` the block's parameter path. With `bias`, the optional projection biases (Qwen3 `attention_bias`)."""
    table: list[Rule] = [
        (layer + "self_attn.q_proj.weight", [((*at, "q_proj"), "linear")]),
        (layer + "self_attn.k_proj.weight", [((*at, "k_proj"), "linear")]),
        (layer + "self_attn.v_proj.weight", [((*at, "v_proj"), "linear")]),
        (layer + "self_attn.o_proj.weight", [((*at, "o_proj"), "linear_in")]),
        (layer + "self_attn.q_norm.weight", [((*at, "q_norm"), "copy")]),
        (layer + "self_attn.k_norm.weight", [((*at, "k_norm"), "copy")]),
    ]
    if bias:
        table += [
            (layer + "self_attn.q_proj.bias", [((*at, "q_bias"), "reshape")]),
            (layer + "self_attn.k_proj.bias", [((*at, "k_bias"), "reshape")]),
            (layer + "self_attn.v_proj.bias", [((*at, "v_bias"), "reshape")]),
            (layer + "self_attn.o_proj.bias", [((*at, "o_bias"), "copy")]),
        ]
    return table


def _format_path(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _is_field(part) -> bool:
    return isinstance(part, str) and part.startswith("{") and part.endswith("}")


def _template_regex(template: str) -> re.Pattern:
    pieces = re.split(r"(\{\w+\})", template)
    return re.compile("".join(f"(?P<{p[1:-1]}>\\d+)" if _is_field(p) else re.escape(p) for p in pieces))


def _resolve(template: tuple, groups: dict[str, str]) -> tuple[tuple, int | None]:
    """Fill `{name}` fields from the matched key; a `("stack", name)` entry gives the per-expert index."""
    out, stack = [], None
    for part in template:
        if isinstance(part, tuple) and part[0] == "stack":
            stack = int(groups[part[1]])
        elif _is_field(part):
            out.append(int(groups[part[1:-1]]))
        else:
            out.append(part)
    return tuple(out), stack


def _bind(parts: list, path: tuple) -> dict[str, int] | None:
    binds: dict[str, int] = {}
    for t, v in zip(parts, path):
        if _is_field(t):
            if not isinstance(v, int) or binds.setdefault(t[1:-1], v) != v:
                return None
        elif t != v:
            return None
    return binds


def checkpoint_key(rules: list[Rule], path: tuple, stack: int | None = None) -> str:
    """The checkpoint key that should have provided parameter `path` (for error messages)."""
    for hf_template, targets in rules:
        for template, _ in targets:
            parts = [p for p in template if not isinstance(p, tuple)]
            stack_field = next((p[1] for p in template if isinstance(p, tuple)), None)
            if len(parts) != len(path) or (stack_field is None) != (stack is None):
                continue
            binds = _bind(parts, path)
            if binds is not None:
                if stack_field is not None:
                    binds[stack_field] = stack
                return hf_template.format(**binds)
    return _format_path(path)


def convert(
    abstract: nnx.State,
    tensors: Iterable[tuple[str, np.ndarray, Path]],
    rules: list[Rule],
    *,
    dtype,
    mesh: Mesh | None = None,
    ignore: Callable[[str], bool] = lambda key: False,
    rename: Callable[[str], str] = lambda key: key,
) -> nnx.State:
    """Fill `abstract` (an NNX state of ShapeDtypeStructs) from `(key, array, file)` tensors."""
    compiled = [(_template_regex(template), targets) for template, targets in rules]
    flat = dict(nnx.to_flat_state(abstract))
    filled: dict[tuple, jax.Array] = {}
    source_of: dict[tuple, str] = {}
    stacks: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    dtype = np.dtype(dtype)

    def place(path, host):
        var = flat[path]
        if mesh is None:
            filled[path] = jax.device_put(host)
        else:
            spec = partition_spec(host.shape, var.get_metadata().get("axes"), mesh)
            filled[path] = jax.device_put(host, NamedSharding(mesh, spec))

    for raw_key, array, file in tensors:
        if ignore(raw_key):
            continue
        key = rename(raw_key)
        matches = [(m, t) for rx, t in compiled if (m := rx.fullmatch(key))]
        if not matches:
            raise CheckpointError(f"unexpected tensor {raw_key!r} in {file}: this model has no parameter for it")
        match, targets = matches[0]
        for template, kind in targets:
            path, stack = _resolve(template, match.groupdict())
            if path not in flat:
                raise CheckpointError(
                    f"unexpected tensor {raw_key!r} in {file}: parameter {_format_path(path)} does not exist in this model"
                )
            full_shape = tuple(flat[path].get_value().shape)
            dst_shape = full_shape[1:] if stack is not None else full_shape
            expected_src, transform = KINDS[kind]
            if tuple(array.shape) != tuple(expected_src(dst_shape)):
                raise CheckpointError(
                    f"tensor {raw_key!r} in {file} has shape {tuple(array.shape)}, expected {tuple(expected_src(dst_shape))} "
                    f"for parameter {_format_path(path)}; the checkpoint does not match its config.json"
                )
            value = np.asarray(transform(array, dst_shape)).astype(dtype)
            if stack is None:
                if path in filled:
                    raise CheckpointError(
                        f"tensor {raw_key!r} in {file} sets parameter {_format_path(path)} again "
                        f"(already set by {source_of[path]!r})"
                    )
                source_of[path] = raw_key
                place(path, value)
                continue
            if path in filled:
                raise CheckpointError(f"tensor {raw_key!r} in {file} sets stacked parameter {_format_path(path)} after it was complete")
            buf, done = stacks.setdefault(path, (np.zeros(full_shape, dtype), np.zeros(full_shape[0], bool)))
            if not 0 <= stack < full_shape[0]:
                raise CheckpointError(f"tensor {raw_key!r} in {file}: index {stack} out of range 0..{full_shape[0] - 1}")
            if done[stack]:
                raise CheckpointError(f"tensor {raw_key!r} in {file} sets {_format_path(path)}[{stack}] twice")
            buf[stack] = value
            done[stack] = True
            if done.all():
                source_of[path] = raw_key
                place(path, buf)
                del stacks[path]

    for path, (_, done) in stacks.items():
        missing = [checkpoint_key(rules, path, i) for i, d in enumerate(done) if not d]
        raise CheckpointError(f"checkpoint is missing tensor(s) {missing[:8]} (parameter {_format_path(path)})")
    missing = [p for p in flat if p not in filled]
    if missing:
        names = ", ".join(f"{checkpoint_key(rules, p)!r}" for p in missing[:8])
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {names}")
    return nnx.from_flat_state([(p, flat[p].replace(filled[p])) for p in flat])
