"""The shipped EAGLE-3 draft of the built-in target (dspark_jax/assets/eagle3_draft, docs/eagle3.md §9)."""

from __future__ import annotations

import argparse
import json

import pytest

import dspark_jax as dj
from dspark_jax import assets
from dspark_jax.proposers.eagle3 import REDUCED_VOCAB, Eagle3Config


@pytest.fixture(scope="module")
def pair():
    target = dj.load_target(assets.TARGET, dtype="float32")
    draft = dj.load_draft(assets.EAGLE3_DRAFT, dtype="float32")
    return target, draft


def heldout_prompts(tokenizer, n):
    lines = (assets.ROOT / "heldout_prompts.jsonl").read_text().splitlines()
    by_set = {}
    for line in lines:
        record = json.loads(line)
        by_set.setdefault(record["set"], record["turns"][0])  # the first held-out prompt of each set
    texts = list(by_set.values())[:n]
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True))
            for t in texts]


def test_shipped_eagle3_draft_loads_in_the_widely_used_layout(pair):
    target, draft = pair
    assert isinstance(draft.config, Eagle3Config)
    # a 4-layer target has 3 interior layers: the reduced-vocabulary layout's low / mid / high, not DeepSpec's 5
    assert draft.config.layout == REDUCED_VOCAB
    assert draft.config.target_layer_ids == (0, 1, 2)
    assert not draft.config.reduced_vocab
    assert draft.config.num_target_layers == target.config.num_layers
    dj.check_pair(target, draft)
    saved = json.loads((assets.EAGLE3_DRAFT / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLMEagle3"]


def test_draft_flag_names_the_builtin_drafts():
    from dspark_jax.tools.commands.common import draft_choice

    for name, path in (("eagle3", assets.EAGLE3_DRAFT), ("dspark", assets.DSPARK_DRAFT), ("dflash", assets.DFLASH_DRAFT)):
        assert draft_choice(argparse.Namespace(draft=name, target=None)) == path


def test_shipped_eagle3_greedy_equals_ar_and_accepts_drafts(pair):
    target, draft = pair
    prompts = heldout_prompts(target.tokenizer, 2)
    assert len(prompts) == 2
    ar = dj.generate(target, None, prompts, max_new_tokens=32, temperature=0.0)
    spec = dj.generate(target, draft, prompts, max_new_tokens=32, temperature=0.0, schedule="fixed")
    assert spec.tokens == ar.tokens
    assert spec.stats.mean_acceptance_length > 1.0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_three_layer_export_writes_the_widely_used_layout_and_round_trips(tmp_path, dtype):
    """A draft the reference layout cannot express (3 feature layers) exports as `LlamaForCausalLMEagle3`."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from safetensors.numpy import load_file

    from dspark_jax.proposers import eagle3_checkpoint
    from dspark_jax.proposers.eagle3 import draft_config_for
    from dspark_jax.training.eagle3 import init_from_target

    target = dj.load_target(assets.TARGET, dtype="float32")
    draft = init_from_target(target, draft_config_for(target.config, target_layer_ids=(0, 1, 2)), seed=3)
    out = eagle3_checkpoint.export_draft(draft, tmp_path / "e3", dtype=dtype)
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["LlamaForCausalLMEagle3"]
    assert written["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    tensors = load_file(out / "model.safetensors")
    assert not np.any(tensors["d2t"]) and np.all(tensors["t2d"])
    assert any(k.startswith("midlayer.") for k in tensors) and not any(k.startswith("layers.0.") for k in tensors)
    back = dj.load_draft(out, dtype=dtype)
    assert back.config.layout == REDUCED_VOCAB and back.config.target_layer_ids == (0, 1, 2)
    assert back.config.draft_length == draft.config.draft_length
    theirs = dict(nnx.to_flat_state(back.params))
    for path, var in nnx.to_flat_state(draft.params):
        want = np.asarray(jnp.asarray(var.get_value(), dtype)).astype(np.float32)
        assert np.array_equal(np.asarray(theirs[path].get_value()).astype(np.float32), want), path
    dj.check_pair(target, back)
