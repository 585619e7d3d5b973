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
