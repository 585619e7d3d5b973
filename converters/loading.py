"""Table-driven, strict checkpoint -> parameter conversion.

A rule table is a list of `(checkpoint_key_template, [(path_template, kind), ...])`, e.g.
`("model.layers.{i}.self_attn.q_proj.weight", [((LAYER, "self_attn", "q_proj"), "linear")])`. In key
templates `{name}` stands for an integer. In path templates:

* `LAYER` (first element) stands for "where HF layer `{i}` lives": a layer map (any object with `slot(i) ->
  (path prefix, stacked index)`, `prefixes` and `layers_at(prefix) -> {stacked index: i}`, e.g.
  `dspark_jax.layers.stack.LayerMap`) gives the parameter path prefix and the index on the stacked axis;
* `("stack", name)` marks one more stacked axis (per-expert tensors);
* `"{name}"` is an integer path element.

Each checkpoint tensor must match exactly one rule; every produced parameter must exist in the abstract
parameter tree and be set exactly once; the source shape is derived from the destination shape and the
transform kind and asserted before any data is moved. Tensors stream one at a time from disk, are cast to
the model dtype and handed to `place` (a device put, sharded or not) when complete; stacked parameters
collect their slices in one host buffer first. Knows nothing of models: only paths, shapes and keys.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from converters.errors import FormatError

LAYER = ("layer", "i")

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


def attention_rules(layer: str, *, bias: bool) -> list[Rule]:
    """q/k/v/o projections and q/k norms of an attention block under key prefix `layer` (ending in `.`),
    parameters at `(LAYER, "self_attn", ...)`. With `bias`, the optional projection biases."""
    at = (LAYER, "self_attn")
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


def format_path(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _is_field(part) -> bool:
    return isinstance(part, str) and part.startswith("{") and part.endswith("}")


def _is_stack(part) -> bool:
    return isinstance(part, tuple) and part[0] == "stack"


def _template_regex(template: str) -> re.Pattern:
    pieces = re.split(r"(\{\w+\})", template)
    return re.compile("".join(f"(?P<{p[1:-1]}>\\d+)" if _is_field(p) else re.escape(p) for p in pieces))


def resolve(template: tuple, groups: dict[str, str], layer_map) -> tuple[tuple, tuple[int, ...]] | None:
    """Parameter path and stacked indices that `template` gives for a matched key (None: no such layer)."""
    out, stack = [], []
    for part in template:
        if part == LAYER:
            slot = layer_map.slot(int(groups[LAYER[1]])) if layer_map is not None else None
            if slot is None:
                return None
            prefix, r = slot
            out.extend(prefix)
            stack.append(r)
        elif _is_stack(part):
            stack.append(int(groups[part[1]]))
        elif _is_field(part):
            out.append(int(groups[part[1:-1]]))
        else:
            out.append(part)
    return tuple(out), tuple(stack)


def physical_matches(template: tuple, path: tuple, layer_map):
    """Ways `template` produces parameter `path`: `(field bindings, stacked-axis names, layer of stacked index)`.

    The stacked-axis names list, in order, the field that indexes each leading stacked axis (`"i"` for the
    layer axis, whose stacked index maps to a layer through the returned dict)."""
    stack_names = [LAYER[1] if p == LAYER else p[1] for p in template if p == LAYER or _is_stack(p)]
    plain = [p for p in template if p != LAYER and not _is_stack(p)]
    heads = [((), None)]
    if template and template[0] == LAYER:
        plain = plain  # the layer prefix replaces the marker at the front
        heads = [(prefix, layer_map.layers_at(prefix)) for prefix in (layer_map.prefixes if layer_map else ())]
    for prefix, layers in heads:
        candidate = list(prefix) + plain
        if len(candidate) != len(path):
            continue
        binds: dict[str, int] = {}
        ok = True
        for t, v in zip(candidate, path):
            if _is_field(t):
                if not isinstance(v, int) or binds.setdefault(t[1:-1], v) != v:
                    ok = False
                    break
            elif t != v:
                ok = False
                break
        if ok:
            yield binds, stack_names, layers


def checkpoint_key(rules: list[Rule], path: tuple, stack: tuple[int, ...] = (), layer_map=None) -> str:
    """The checkpoint key that should have provided parameter `path` (slice `stack`), for error messages."""
    for key_template, targets in rules:
        for template, _ in targets:
            for binds, names, layers in physical_matches(template, path, layer_map):
                if len(names) != len(stack):
                    continue
                binds = dict(binds)
                for name, idx in zip(names, stack):
                    binds[name] = layers[idx] if name == LAYER[1] and layers is not None else idx
                try:
                    return key_template.format(**binds)
                except KeyError:
                    continue
    return format_path(path) + (f"[{', '.join(map(str, stack))}]" if stack else "")


def convert(
    abstract: dict[tuple, tuple[tuple[int, ...], np.dtype]],
    tensors: Iterable[tuple[str, np.ndarray, Path]],
    rules: list[Rule],
    *,
    dtype,
    place: Callable[[tuple, np.ndarray], object],
    layer_map=None,
    ignore: Callable[[str], bool] = lambda key: False,
    rename: Callable[[str], str] = lambda key: key,
    dtypes: dict[tuple, np.dtype] | None = None,
) -> dict[tuple, object]:
    """Fill the parameters `abstract` (`{path: shape}`) from `(key, array, file)` tensors -> `{path: placed}`.

    Tensors are cast to `dtype`, or to `dtypes[path]` for the parameters it lists (e.g. a float32 router in
    a bfloat16 model)."""
    compiled = [(_template_regex(template), targets) for template, targets in rules]
    filled: dict[tuple, object] = {}
    source_of: dict[tuple, str] = {}
    stacks: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    dtype = np.dtype(dtype)

    for raw_key, array, file in tensors:
        if ignore(raw_key):
            continue
        key = rename(raw_key)
        matches = [(m, t) for rx, t in compiled if (m := rx.fullmatch(key))]
        if not matches:
            raise FormatError(f"unexpected tensor {raw_key!r} in {file}: this model has no parameter for it")
        match, targets = matches[0]
        for template, kind in targets:
            resolved = resolve(template, match.groupdict(), layer_map)
            if resolved is None or resolved[0] not in abstract:
                where = "its layer" if resolved is None else f"parameter {format_path(resolved[0])}"
                raise FormatError(f"unexpected tensor {raw_key!r} in {file}: {where} does not exist in this model")
            path, stack = resolved
            full_shape = tuple(abstract[path])
            dst_shape = full_shape[len(stack) :]
            expected_src, transform = KINDS[kind]
            if tuple(array.shape) != tuple(expected_src(dst_shape)):
                raise FormatError(
                    f"tensor {raw_key!r} in {file} has shape {tuple(array.shape)}, expected {tuple(expected_src(dst_shape))} "
                    f"for parameter {format_path(path)}; the checkpoint does not match its config.json"
                )
            value = np.asarray(transform(array, dst_shape)).astype(dtypes.get(path, dtype) if dtypes else dtype)
            if not stack:
                if path in filled:
                    raise FormatError(
                        f"tensor {raw_key!r} in {file} sets parameter {format_path(path)} again "
                        f"(already set by {source_of[path]!r})"
                    )
                source_of[path] = raw_key
                filled[path] = place(path, value)
                continue
            if path in filled:
                raise FormatError(f"tensor {raw_key!r} in {file} sets stacked parameter {format_path(path)} after it was complete")
            lead = full_shape[: len(stack)]
            if not all(0 <= s < n for s, n in zip(stack, lead)):
                raise FormatError(f"tensor {raw_key!r} in {file}: index {stack} out of range {lead}")
            buf, done = stacks.setdefault(path, (np.zeros(full_shape, value.dtype), np.zeros(lead, bool)))
            if done[stack]:
                raise FormatError(f"tensor {raw_key!r} in {file} sets {format_path(path)}{list(stack)} twice")
            buf[stack] = value
            done[stack] = True
            if done.all():
                source_of[path] = raw_key
                filled[path] = place(path, buf)
                del stacks[path]

    for path, (_, done) in stacks.items():
        missing = [checkpoint_key(rules, path, tuple(int(x) for x in idx), layer_map) for idx in zip(*np.nonzero(~done))]
        raise FormatError(f"checkpoint is missing tensor(s) {missing[:8]} (parameter {format_path(path)})")
    missing = [p for p in abstract if p not in filled]
    if missing:
        names = []
        for p in missing[:8]:
            lead = _lead_dims(rules, p, layer_map)
            names.append(checkpoint_key(rules, p, (0,) * lead, layer_map))
        raise FormatError(f"checkpoint is missing {len(missing)} parameter(s), e.g. tensor(s) {', '.join(map(repr, names))}")
    return filled


def _lead_dims(rules: list[Rule], path: tuple, layer_map) -> int:
    for _, targets in rules:
        for template, _ in targets:
            for _, names, _ in physical_matches(template, path, layer_map):
                return len(names)
    return 0
