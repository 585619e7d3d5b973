"""A forced 8-device CPU mesh (data=2, model=4) produces the same tokens as one device.

Runs in a subprocess because the device count is fixed when JAX starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from hf_models import qwen3

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np
    import dspark_jax as dj
    from dspark_jax.testing import synthetic

    assert len(jax.devices()) == 8, jax.devices()
    path = sys.argv[1]
    prompts = [[3, 9, 27, 4], list(range(10, 23)), [50], [7, 7, 7]]
    mesh = dj.make_mesh(data=2, model=4)
    single = dj.load_target(path, dtype="float32")
    sharded = dj.load_target(path, dtype="float32", mesh=mesh)
    spec = sharded.params["groups"][0]["layers"][0]["self_attn"]["q_proj"].get_value().sharding.spec
    cfg = synthetic.draft_config_for(single.config, num_layers=1, markov_rank=16)
    draft = synthetic.random_draft(single, cfg, seed=1)
    draft_sharded = draft.with_params(dj.shard_params(draft.params, mesh))
    out = {"q_proj_spec": [str(s) for s in spec]}
    for name, kwargs in {"greedy": dict(), "sampled": dict(temperature=1.0, top_p=0.9, seed=3)}.items():
        a = dj.generate(single, None, prompts, max_new_tokens=12, stop_token_ids=[], **kwargs).tokens
        b = dj.generate(sharded, None, prompts, max_new_tokens=12, stop_token_ids=[], **kwargs).tokens
        c = dj.generate(single, draft, prompts, max_new_tokens=12, stop_token_ids=[], draft_length=3, **kwargs).tokens
        d = dj.generate(sharded, draft_sharded, prompts, max_new_tokens=12, stop_token_ids=[], draft_length=3, **kwargs).tokens
        out[name] = {"ar_equal": a == b, "spec_equal": c == d, "spec_vs_ar": a == c}
    print(json.dumps(out))
    """
)


def test_eight_device_mesh_matches_single_device(tmp_path):
    qwen3(tmp_path / "model", seed=4, num_attention_heads=4, num_key_value_heads=4)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "model")], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["q_proj_spec"] == ["None", "None", "model", "None"], "q heads should be split over the model axis"
    assert result["greedy"] == {"ar_equal": True, "spec_equal": True, "spec_vs_ar": True}
    assert result["sampled"]["ar_equal"] and result["sampled"]["spec_equal"]


PLACEMENT = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    from flax import nnx
    import dspark_jax as dj
    from dspark_jax.engine import decode, spec
    from dspark_jax.engine.generation import _placement, _prepare
    from dspark_jax.testing import synthetic

    mesh = dj.make_mesh(data=2, model=4)
    single = dj.load_target(sys.argv[1], dtype="float32")
    sharded = dj.load_target(sys.argv[1], dtype="float32", mesh=mesh)
    prompts = [[3, 9, 27, 4], list(range(10, 23)), [50], [7, 7, 7]]
    out = {}

    def placement(arr):
        return {"per_device": sorted(s.data.nbytes for s in arr.addressable_shards), "total": arr.nbytes,
                "devices": len({s.device for s in arr.addressable_shards})}

    flat = dict(nnx.to_flat_state(sharded.params))
    for name in ("gate_proj", "down_proj", "q_proj", "o_proj"):
        for path, var in flat.items():
            if path[-1] == name:  # dense MLP kernels are [n, D, F]; expert kernels [n, E, D, F]
                kind = "experts_" if name in ("gate_proj", "down_proj") and var.get_value().ndim == 4 else ""
                out[kind + name] = placement(var.get_value())
    draft = synthetic.random_draft(single, synthetic.draft_config_for(single.config, markov_rank=16), seed=1)
    draft_sharded = draft.with_params(dj.shard_params(draft.params, mesh))
    K, req, _, shapes, _ = _prepare(sharded, draft_sharded, prompts, 3, None, max_new_tokens=12, temperature=0.0, top_k=0,
                                    top_p=1.0, seed=0, stop_token_ids=[], confidence_threshold=0.0)
    with _placement(sharded):
        state = spec.start_jit(sharded.graphdef, sharded.params, draft_sharded.graphdef, draft_sharded.params, req,
                               K=K, **shapes)
        state = spec.spec_step(sharded.graphdef, sharded.params, draft_sharded.graphdef, draft_sharded.params, state,
                               K=K, capacity=shapes["capacity"])
    out["target_cache_k"] = placement(state.target_cache[0][0].k)
    out["target_cache_v"] = placement(state.target_cache[0][0].v)
    for kwargs in ({}, {"temperature": 1.0, "seed": 3}):
        a = dj.generate(single, None, prompts, max_new_tokens=12, stop_token_ids=[], **kwargs).tokens
        b = dj.generate(sharded, None, prompts, max_new_tokens=12, stop_token_ids=[], **kwargs).tokens
        c = dj.generate(sharded, draft_sharded, prompts, max_new_tokens=12, stop_token_ids=[], draft_length=3, **kwargs).tokens
        d = dj.generate(single, draft, prompts, max_new_tokens=12, stop_token_ids=[], draft_length=3, **kwargs).tokens
        out.setdefault("equal", []).append([a == b, c == d])
    out["greedy_spec_vs_ar"] = out["equal"] and dj.generate(sharded, draft_sharded, prompts, max_new_tokens=12,
                                                            stop_token_ids=[], draft_length=3).tokens == \\
        dj.generate(single, None, prompts, max_new_tokens=12, stop_token_ids=[]).tokens
    print(json.dumps(out))
    """
)


def test_placement_of_experts_weights_and_caches_on_eight_devices(tmp_path):
    """MoE target on (data=2, model=4): each device holds exactly its share of the bytes of the expert weights
    (experts over `model`), the dense MLP and attention weights (MLP width / heads over `model`) and the KV cache (rows over `data`, KV heads
    over `model`, both in the speculative state after a round); tokens equal one device's, greedy and sampled."""
    qwen3(tmp_path / "moe", moe=True, seed=4, num_attention_heads=4, num_key_value_heads=4, num_experts=8,
          mlp_only_layers=[0], intermediate_size=64)  # layer 0 dense: both MLP kinds
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", PLACEMENT, str(tmp_path / "moe")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, share in (("gate_proj", 4), ("down_proj", 4), ("experts_gate_proj", 4), ("experts_down_proj", 4),
                        ("q_proj", 4), ("o_proj", 4), ("target_cache_k", 8), ("target_cache_v", 8)):
        placed = r[name]
        assert placed["devices"] == 8, name
        assert placed["per_device"] == [placed["total"] // share] * 8, f"{name}: {placed}"
    assert r["equal"] == [[True, True], [True, True]]
    assert r["greedy_spec_vs_ar"]
