"""Peak host memory while loading a checkpoint: one process vs each process of a 2-process job.

Writes a Qwen3-shaped checkpoint of random bf16 weights (two safetensors shards and an index; ~0.6 GB by
default), then loads it with `load_target(..., dtype="bfloat16")` in fresh processes and records each process's
resident memory before the load and its peak during the load (`VmHWM`, reset just before the load through
/proc/self/clear_refs, so imports and JAX start-up do not count twice):

* `1 process, no mesh`: the streaming loader, every tensor on one device;
* `1 process, mesh model=2`: two CPU devices of one process, the sliced loader (`models.loading.fill_sharded`);
* `2 processes, mesh model=2`: one CPU device each, gloo collectives; the model axis spans the processes, so each
  process holds half of every sharded weight and reads only that half from the files;
* `2 processes, mesh data=2`: the model replicated on both processes (each reads everything), for contrast.

Each process also checks its shards against the checkpoint (after the measurement). Linux only (/proc).

    python benchmarks/sharded_load.py [--hidden 1024 --layers 12 --vocab 32768] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def write_checkpoint(directory: Path, hidden: int, layers: int, vocab: int, intermediate: int) -> int:
    """A random-weight Qwen3 checkpoint in two safetensors shards. -> bytes of weights."""
    import ml_dtypes
    import numpy as np

    from converters.safetensors_io import save_file

    heads, kv_heads, head_dim = hidden // 64, max(1, hidden // 128), 64
    config = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "max_position_embeddings": 2048,
        "tie_word_embeddings": True, "attention_bias": False, "layer_types": ["full_attention"] * layers,
        "bos_token_id": None, "eos_token_id": 0, "dtype": "bfloat16",
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    def ones(n):
        return np.ones(n, ml_dtypes.bfloat16)

    weight_map, total = {}, 0
    halves = [range(0, layers // 2), range(layers // 2, layers)]
    for shard, layer_ids in enumerate(halves):
        tensors = {}
        if shard == 0:
            tensors["model.embed_tokens.weight"] = w(vocab, hidden)
        else:
            tensors["model.norm.weight"] = ones(hidden)
        for i in layer_ids:
            p = f"model.layers.{i}."
            tensors.update({
                p + "input_layernorm.weight": ones(hidden), p + "post_attention_layernorm.weight": ones(hidden),
                p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
                p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden),
                p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
                p + "self_attn.q_norm.weight": ones(head_dim), p + "self_attn.k_norm.weight": ones(head_dim),
                p + "mlp.gate_proj.weight": w(intermediate, hidden), p + "mlp.up_proj.weight": w(intermediate, hidden),
                p + "mlp.down_proj.weight": w(hidden, intermediate),
            })
        name = f"model-{shard + 1:05d}-of-00002.safetensors"
        save_file(tensors, directory / name)
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                        "weight_map": weight_map}))
    return total


def load_once(args) -> None:
    """One measured load (a child process); prints one JSON line."""
    import jax

    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)
    import numpy as np
    from flax import nnx

    import dspark_jax as dj
    from converters.safetensors_io import CheckpointIndex
    from dspark_jax.sharding import make_mesh

    mesh = None if args.mesh is None else make_mesh(*args.mesh)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = status_kib("VmRSS")
    t0 = time.perf_counter()
    target = dj.load_target(args.checkpoint, dtype="bfloat16", mesh=mesh)
    jax.block_until_ready(jax.tree.leaves(target.params))
    seconds = time.perf_counter() - t0
    peak = status_kib("VmHWM")
    local_bytes = sum(s.data.nbytes for x in jax.tree.leaves(target.params) for s in x.addressable_shards)
    # after measuring: every local shard equals the checkpoint's slice (embedding and one stacked MLP weight)
    index = CheckpointIndex(args.checkpoint)
    flat = dict(nnx.to_flat_state(target.params))
    checked = 0
    for path, var in flat.items():
        if path == ("embed_tokens",):
            full = index.get("model.embed_tokens.weight")
        elif path[-2:] == ("mlp", "down_proj"):
            full = np.stack([index.get(f"model.layers.{i}.mlp.down_proj.weight").T for i in range(var.get_value().shape[0])])
        else:
            continue
        for shard in var.get_value().addressable_shards:
            assert np.array_equal(np.asarray(shard.data), full[shard.index]), path
            checked += 1
    print(json.dumps({"process": args.process_id, "rss_before_mib": before / 1024, "peak_mib": peak / 1024,
                      "load_increase_mib": (peak - before) / 1024, "local_param_mib": local_bytes / 2**20,
                      "load_s": seconds, "shards_checked": checked}), flush=True)
    if args.num_processes > 1:
        jax.distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(checkpoint: Path, *, processes: int, devices: int, mesh: tuple[int, int] | None) -> list[dict]:
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, "--load", str(checkpoint), "--num-processes", str(processes), "--port", str(port)]
    if mesh is not None:
        cmd += ["--mesh", f"{mesh[0]},{mesh[1]}"]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(processes)]
    rows = []
    for p in procs:
        out, err = p.communicate(timeout=1200)
        if p.returncode != 0:
            raise RuntimeError(f"load failed ({p.returncode}):\n{err[-3000:]}")
        rows.append(json.loads([line for line in out.splitlines() if line.startswith("{")][-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--load", default=None, help=argparse.SUPPRESS)  # child mode: the checkpoint to load
    parser.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--mesh", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load is not None:
        args.checkpoint = args.load
        args.mesh = None if args.mesh is None else tuple(int(x) for x in args.mesh.split(","))
        return load_once(args)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "checkpoint"
        size = write_checkpoint(checkpoint, args.hidden, args.layers, args.vocab, args.intermediate)
        arms = [
            ("1 process, no mesh", 1, 1, None),
            ("1 process, mesh model=2 (2 devices)", 1, 2, (1, 2)),
            ("2 processes, mesh model=2 (1 device each)", 2, 1, (1, 2)),
            ("2 processes, mesh data=2 (1 device each)", 2, 1, (2, 1)),
        ]
        results = []
        for name, processes, devices, mesh in arms:
            rows = measure(checkpoint, processes=processes, devices=devices, mesh=mesh)
            results.append({"arm": name, "processes": rows})
            print(name, json.dumps(rows), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import platform

    import jax

    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "jax": jax.__version__},
              "checkpoint_mib": size / 2**20, "shape": {k: getattr(args, k) for k in ("hidden", "layers", "vocab", "intermediate")},
              "arms": results}
    (out / "sharded_load.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Peak host memory while loading (benchmarks/sharded_load.py)",
        "",
        f"Checkpoint: Qwen3-shaped, random bf16 weights, {size / 2**20:.0f} MiB in two safetensors shards "
        f"(hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, MLP {args.intermediate}); loaded as bf16 on "
        "XLA:CPU. Peak = VmHWM during the load (reset before it); increase = peak minus the RSS just before the load "
        "(Python, JAX and the runtime). Local params = bytes of the shards on this process's devices.",
        "",
        "| arm | process | RSS before (MiB) | peak (MiB) | increase (MiB) | increase / checkpoint | local params (MiB) | load (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in results:
        for row in arm["processes"]:
            lines.append(
                f"| {arm['arm']} | {row['process']} | {row['rss_before_mib']:.0f} | {row['peak_mib']:.0f} | "
                f"{row['load_increase_mib']:.0f} | {row['load_increase_mib'] / (size / 2**20):.2f} | "
                f"{row['local_param_mib']:.0f} | {row['load_s']:.1f} |")
    (out / "sharded_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
