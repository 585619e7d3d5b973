"""Parameters -> checkpoint tensors: the rule tables of `loading` read backwards.

Every parameter is matched against the same rules the loader uses (first matching rule wins), stacked axes
are split back into one tensor per layer (and expert), and the loader's transform for the rule's kind is
inverted, so a written checkpoint loads back bit-exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np

from converters.errors import FormatError
from converters.loading import LAYER, Rule, format_path, physical_matches

# kind -> destination array (our layout) -> source array (checkpoint layout); inverses of `loading.KINDS`.
INVERSE_KINDS = {
    "copy": lambda a: a,
    "linear": lambda a: a.reshape(a.shape[0], -1).T,  # [in, *out] -> [out, in]
    "linear_in": lambda a: a.reshape(-1, a.shape[-1]).T,  # [*in, out] -> [out, in]
    "reshape": lambda a: a.reshape(-1),
    "experts": lambda a: a.transpose(0, 2, 1),
}


def export_tensors(params: Iterable[tuple[tuple, np.ndarray]], rules: list[Rule], dtype=None, layer_map=None) -> dict[str, np.ndarray]:
    """Checkpoint tensors `{key: array}` of `(path, value)` parameters (cast to `dtype` if given)."""
    out: dict[str, np.ndarray] = {}
    for path, value in params:
        value = np.asarray(value)
        if dtype is not None:
            value = value.astype(dtype)
        found = None
        for key_template, targets in rules:
            for template, kind in targets:
                if kind not in INVERSE_KINDS:
                    continue  # fused layouts read two parameters from one tensor; the per-expert rule writes them
                for match in physical_matches(template, path, layer_map):
                    found = (key_template, kind, *match)
                    break
                if found:
                    break
            if found:
                break
        if found is None:
            raise FormatError(f"parameter {format_path(path)} has no checkpoint key in this layout")
        key_template, kind, binds, names, layers = found
        for idx in itertools.product(*(range(n) for n in value.shape[: len(names)])):
            b = dict(binds)
            for name, i in zip(names, idx):
                b[name] = layers[i] if name == LAYER[1] and layers is not None else i
            key = key_template.format(**b)
            if key in out:
                raise FormatError(f"checkpoint key {key!r} would be written twice (parameter {format_path(path)})")
            out[key] = np.ascontiguousarray(INVERSE_KINDS[kind](value[idx]))
    return out
