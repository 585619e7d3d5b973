"""Measurement helpers shared by `benchmarks/*.py` and `dspark-jax bench` (rules: benchmarks.md).

* `interleave` runs several arms side by side (A B A B ...): each arm's first call (compilation plus one run)
  is timed apart from the steady-state repetitions, and a summary quotes the median.
* `machine` records what the numbers were measured on (CPU model, cores, accelerators, library versions).
* `memory_bandwidth` measures the host's streaming read bandwidth in the same run (a large array sum in JAX
  and numpy, and a numpy copy), the denominator of a CPU roofline fraction.
* `Table` / `write_report` keep the JSON and the markdown of a report identical: numbers are rounded once
  (`rounded`) and the markdown prints exactly the rounded values the JSON stores.
* `line_plot` / `bar_plot` write PNG figures (matplotlib, non-interactive backend).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SIGNIFICANT_DIGITS = 4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------ timing


@dataclasses.dataclass
class ArmTiming:
    """Wall times of one arm: the first call (compilation + one run) and the steady-state repetitions."""

    name: str
    first_call_s: float
    times_s: list[float]
    result: Any = None  # what the last call returned (e.g. a GenerationResult), for the caller's statistics

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def compile_s(self) -> float:
        """First call minus a steady-state call: the compilation (and first-touch) cost."""
        return max(0.0, self.first_call_s - self.median_s)

    def summary(self) -> dict:
        return {
            "median_s": self.median_s,
            "min_s": min(self.times_s),
            "max_s": max(self.times_s),
            "first_call_s": self.first_call_s,
            "compile_s": self.compile_s,
            "repetitions": len(self.times_s),
            "times_s": list(self.times_s),
        }


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - t0, out


def interleave(arms: dict[str, Callable[[], Any]], repetitions: int, *, log: Callable[[str], None] | None = None) -> dict[str, ArmTiming]:
    """Time every arm `repetitions` times in the order A B C A B C ..., after one timed first call each.

    Interleaving makes drifting machine load (other processes, thermal state) hit all arms alike. Each
    callable must return what it computed (JAX arrays are waited for) so asynchronous dispatch is timed.
    """
    if repetitions < 1:
        raise ValueError(f"repetitions must be >= 1, got {repetitions}")
    timings = {}
    for name, fn in arms.items():
        first, out = _timed(fn)
        timings[name] = ArmTiming(name, first, [], out)
        if log:
            log(f"  {name}: first call {first:.3f}s")
    for rep in range(repetitions):
        for name, fn in arms.items():
            t, out = _timed(fn)
            timings[name].times_s.append(t)
            timings[name].result = out
        if log:
            log(f"  rep {rep + 1}/{repetitions}: " + "  ".join(f"{n} {timings[n].times_s[-1]:.3f}s" for n in arms))
    return timings


def compile_seconds(jitted: Callable, *args, **kwargs) -> float:
    """Wall time to lower and compile `jitted` for these arguments (ahead of time, nothing is run).

    On a loaded machine this is steadier than "first call minus a steady call", which mixes in run-time noise.
    """
    t0 = time.perf_counter()
    jitted.lower(*args, **kwargs).compile()
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- environment


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """What a measurement ran on: CPU model and cores, JAX devices, library versions."""
    devices = jax.devices()
    return {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "jax_backend": jax.default_backend(),
        "devices": [f"{d.platform}:{d.device_kind}" for d in devices],
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers")},
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def bandwidth_probes(nbytes: int = 1 << 30) -> dict[str, tuple[Callable[[], Any], int]]:
    """Streaming probes of host memory: name -> (zero-argument callable, bytes it moves).

    `jax_sum` / `numpy_sum` read an fp32 array of `nbytes` once (a read-only stream); `jax_matvec` reads it
    as a `[n / 8192, 8192]` fp32 matrix times a vector, the access pattern of a memory-bound decode step;
    `numpy_copy` moves the bytes read plus the bytes written. Pick `nbytes` well above the last-level cache.
    The callables can join the arms of `interleave`, so the bandwidth is measured under the same load.
    """
    n = (nbytes // 4) // 8192 * 8192
    host = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    dev = jnp.asarray(host)
    total = jax.jit(jnp.sum)
    matvec = jax.jit(lambda w, x: w @ x)
    matrix, vector = dev.reshape(n // 8192, 8192), jnp.ones((8192,), jnp.float32)
    dst = np.empty_like(host)
    return {
        "jax_sum": (lambda: total(dev), n * 4),
        "numpy_sum": (lambda: host.sum(), n * 4),
        "jax_matvec": (lambda: matvec(matrix, vector), n * 4),
        "numpy_copy": (lambda: np.copyto(dst, host), 2 * n * 4),
    }


def memory_bandwidth(nbytes: int = 1 << 30, repetitions: int = 5) -> dict:
    """Streaming bandwidth of host memory in GB/s (1e9 bytes/s) from `bandwidth_probes`, median of `repetitions`.

    `best_gbs` is the highest of the probes: the most demanding bound.
    """
    probes = bandwidth_probes(nbytes)
    t = interleave({name: fn for name, (fn, _) in probes.items()}, repetitions)
    out = {"bytes": probes["jax_sum"][1], "repetitions": repetitions}
    out |= {f"{name}_gbs": moved / t[name].median_s / 1e9 for name, (_, moved) in probes.items()}
    out["best_gbs"] = max(v for k, v in out.items() if k.endswith("_gbs"))
    return out


# ------------------------------------------------------------------------------------------------ tables


def rounded(x: Any, digits: int = SIGNIFICANT_DIGITS) -> Any:
    """`x` rounded to `digits` significant digits (floats only; ints, None and strings pass through)."""
    if isinstance(x, (bool, np.bool_)) or x is None or isinstance(x, str):
        return x
    if isinstance(x, (int, np.integer)):
        return int(x)
    x = float(x)
    if not math.isfinite(x) or x == 0:
        return x
    return float(f"{x:.{digits}g}")


def cell_text(x: Any) -> str:
    """How the markdown shows a (rounded) table cell; `float(cell_text(x)) == x` for numbers."""
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:g}" if abs(x) < 1e6 else f"{x:.{SIGNIFICANT_DIGITS}g}"
    return str(x)


@dataclasses.dataclass
class Table:
    """A titled table whose cells are rounded once; the JSON and the markdown show the same values."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""

    def __post_init__(self):
        self.rows = [[rounded(c) for c in row] for row in self.rows]
        for row in self.rows:
            if len(row) != len(self.columns):
                raise ValueError(f"table {self.title!r}: row {row} does not have {len(self.columns)} cells")

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        if self.note:
            lines += [self.note, ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        lines += ["| " + " | ".join(cell_text(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        return {"title": self.title, "columns": self.columns, "rows": self.rows, "note": self.note}


def parse_markdown_tables(text: str) -> dict[str, list[list[str]]]:
    """`### title` + pipe table blocks of a markdown text -> {title: [header, *rows]} (cells as text)."""
    tables, title, current = {}, None, None
    for line in text.splitlines():
        if line.startswith("### "):
            title, current = line[4:].strip(), None
        elif line.startswith("|") and title is not None:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if all(set(c) <= {"-", ":"} and c for c in cells):
                continue  # the header separator
            if current is None:
                current = tables.setdefault(title, [])
            current.append(cells)
        elif not line.strip() and current is not None:
            current = None
    return tables


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    return path


def write_report(
    directory: str | Path,
    name: str,
    *,
    title: str,
    tables: Sequence[Table],
    meta: dict,
    data: dict | None = None,
    intro: str = "",
    figures: Sequence[str] = (),
) -> tuple[Path, Path]:
    """Write `<name>.json` (meta, tables, raw data) and `<name>.md` (the same tables) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = write_json(directory / f"{name}.json", {"meta": meta, "tables": [t.to_json() for t in tables], "data": data or {}})
    parts = [f"# {title}", ""]
    if intro:
        parts += [intro.strip(), ""]
    parts += [t.markdown() for t in tables]
    parts += [f"![{Path(f).stem}]({Path(f).name})\n" for f in figures]
    parts.append(f"Raw numbers, machine and settings: `{json_path.name}`.\n")
    md_path = directory / f"{name}.md"
    md_path.write_text("\n".join(parts))
    return json_path, md_path


# ------------------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_plot(
    path: str | Path,
    x: Sequence[float],
    series: dict[str, Sequence[float | None]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
    ax=None,
) -> Path | None:
    """One line per series (None values are skipped). With `ax`, draw into it and write nothing."""
    plt = _pyplot()
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, ys in series.items():
        pts = [(a, b) for a, b in zip(x, ys, strict=True) if b is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    if len(x) <= 16:
        ax.set_xticks(list(x), [str(v) for v in x])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    if own:
        return save_figure(fig, path)
    return None


def bar_plot(
    path: str | Path,
    categories: Sequence[str],
    series: dict[str, Sequence[float | None]],
    *,
    ylabel: str,
    title: str,
) -> Path:
    """Grouped bars: one group per category, one bar per series (None = no bar)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(categories) * max(1, len(series)) / 2), 4), dpi=100)
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(categories))]
        ax.bar([x for x, v in zip(xs, values, strict=True) if v is not None], [v for v in values if v is not None], width, label=label)
    ax.set_xticks(range(len(categories)), list(categories))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    _pyplot().close(fig)
    return path


# ------------------------------------------------------------------------------------ cost-inflated target


def inflate_target(target, megabytes: float, *, seed: int = 0):
    """`target` plus extra layers (appended after its last layer) holding about `megabytes` MB of parameters.

    The extra layers have random weights but zero output projections (`o_proj`, `down_proj`), so each adds
    exactly zero to the residual stream: logits and every captured feature of the original layers are
    unchanged bit for bit, while each decode step reads the extra weights like a real model would
    (benchmarks.md, "cost-inflated target"). Dense Qwen3 targets only.
    """
    from flax import nnx

    from dspark_jax.errors import ConfigError
    from dspark_jax.handles import Target
    from dspark_jax.layers.params import Init
    from dspark_jax.models.qwen3 import Qwen3Config, Qwen3Model

    cfg = target.config
    if not isinstance(cfg, Qwen3Config) or cfg.is_moe:
        raise ConfigError(f"cost inflation supports dense Qwen3 targets only, not {type(cfg).__name__}")
    flat = dict(nnx.to_flat_state(target.params))
    L = cfg.num_layers
    stacked = {p: v.get_value() for p, v in flat.items() if p[0] == "groups"}  # one group of L dense layers
    layer_bytes = sum(v.nbytes // L for v in stacked.values())
    extra = max(1, math.ceil(megabytes * 1e6 / layer_bytes))
    big_cfg = dataclasses.replace(cfg, num_layers=L + extra)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Qwen3Model(big_cfg, Init(nnx.Rngs(0), target.dtype))))
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(params):
        shape, name = var.get_value().shape, str(path[-1])
        if path[0] != "groups":
            value = flat[path].get_value()
        else:
            if name in ("o_proj", "down_proj") or name.endswith("bias"):
                new = np.zeros((extra, *shape[1:]), np.float32)
            elif "norm" in name:
                new = np.ones((extra, *shape[1:]), np.float32)
            else:  # N(0, 0.02) like `Target.random`, drawn on the host
                new = 0.02 * rng.standard_normal((extra, *shape[1:]), dtype=np.float32)
            value = np.concatenate([np.asarray(stacked[path], np.float32), new])
        var.set_value(jnp.asarray(value, target.dtype))
    return Target(config=big_cfg, graphdef=graphdef, params=params, dtype=target.dtype, directory=target.directory,
                  stop_token_ids=target.stop_token_ids)


def retarget_draft(draft, target):
    """`draft` declared for `target`'s layer count (for a cost-inflated target, whose extra layers come last):
    its config, and the module's own, which `check_target` reads."""
    from flax import nnx

    from dspark_jax.layers.params import Init

    config = dataclasses.replace(draft.config, num_target_layers=target.config.num_layers)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: type(draft.module)(config, Init(nnx.Rngs(0), draft.dtype))))
    return dataclasses.replace(draft, config=config, graphdef=graphdef)
