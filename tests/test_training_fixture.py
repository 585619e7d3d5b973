"""The fixture pair's pieces against independent references (transformers), and the shipped assets."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import dspark_jax as dj
from dspark_jax import assets
from dspark_jax.config import RopeConfig
from dspark_jax.handles import Target
from dspark_jax.models.qwen3 import Qwen3Config
from dspark_jax.training import bpe, corpus, lm

PROMPTS = next((p for p in (Path(__file__).parent / "data" / "prompts", Path("/work/shared/data/prompts")) if p.is_dir()), None)


@pytest.mark.parametrize("tied", [True, False])
def test_exported_target_runs_in_transformers(tmp_path, tied):
    """`export_target` writes an HF checkpoint: transformers' Qwen3 gives our logits, and it loads back exactly."""
    import torch
    from transformers import Qwen3ForCausalLM

    from dspark_jax.models.qwen3.checkpoint import export_target

    cfg = Qwen3Config(model_type="qwen3", vocab_size=80, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=12, rope=RopeConfig(theta=10000.0, max_position_embeddings=128), tie_word_embeddings=tied,
                      max_position_embeddings=128)
    target = Target.random(cfg, seed=4, stop_token_ids=(2, 0))
    export_target(target, tmp_path, dtype="float32", pad_token_id=0)
    ids = np.random.default_rng(0).integers(0, 80, (2, 9))
    model = Qwen3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    m = target.module
    hidden, _, _ = m(jnp.asarray(ids, jnp.int32), jnp.zeros((2,), jnp.int32), m.init_cache(2, 9))
    np.testing.assert_allclose(np.asarray(m.logits(hidden)), theirs, atol=2e-5 * max(1.0, float(np.abs(theirs).max())))
    loaded = dj.load_target(tmp_path, dtype="float32")
    assert loaded.config == cfg and loaded.stop_token_ids == (2, 0)
    for a, b in zip(jax_leaves(loaded.params), jax_leaves(target.params), strict=True):
        np.testing.assert_array_equal(a, b)


def jax_leaves(state):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_tokenizer_and_chat_template_match_transformers(tmp_path):
    from transformers import AutoTokenizer

    from dspark_jax.tokenizer import Tokenizer

    texts = ["def add(a, b):\n    return a + b\n", "Write a function that adds two numbers.", "x = [i * i for i in range(10)]"] * 30
    tok = bpe.train_tokenizer(texts, 320)
    bpe.save_tokenizer(tok, tmp_path, 512)
    ours = Tokenizer.from_directory(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "Write a function that adds two numbers."},
                {"role": "assistant", "content": "def add(a, b):\n    return a + b"}]
    for gen in (False, True):
        rendered = ours.apply_chat_template(messages[: 1 if gen else 2], add_generation_prompt=gen)
        assert rendered == theirs.apply_chat_template(messages[: 1 if gen else 2], tokenize=False, add_generation_prompt=gen)
        assert ours.encode(rendered) == theirs.encode(rendered, add_special_tokens=False)
    assert rendered.endswith(bpe.ASSISTANT_HEADER) and rendered.startswith("<|im_start|>user\n")
    for i, special in enumerate(bpe.SPECIAL_TOKENS):  # one id each, in the documented order
        assert ours.encode(special) == [i] and ours.token_id(special) == i
    assert theirs.eos_token == bpe.IM_END and theirs.pad_token == bpe.ENDOFTEXT


def test_prompt_split_and_function_conversations(tmp_path):
    for name, n in (("a", 10), ("b", 5)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"turns": [f"{name}{i}", "second"]}) + "\n" for i in range(n)))
    split = corpus.split_prompts(tmp_path, {"a": 3, "b": 2}, {"a": 2})
    assert split["a"] == {"test": ["a0", "a1", "a2"], "dev": ["a3", "a4"], "train": [f"a{i}" for i in range(5, 10)]}
    assert split["b"] == {"test": ["b0", "b1"], "dev": [], "train": ["b2", "b3", "b4"]}
    with pytest.raises(dj.InputError, match="fewer than"):
        corpus.split_prompts(tmp_path, {"b": 6}, {})
    src = tmp_path / "mod.py"
    src.write_text('def area(width, height):\n    """Return the area of a rectangle of the given size."""\n'
                   "    result = width * height\n    return result\n\n\ndef _private(x):\n    \"\"\"Hidden helper function here.\"\"\"\n"
                   "    y = x\n    return y\n")
    convs = list(corpus.function_conversations(src))
    assert len(convs) == 1
    user, answer = convs[0]["conversations"]
    assert "area" in user["content"] and answer["content"].startswith("```python\ndef area(width, height):")
    assert answer["content"].endswith("return result\n```")


def test_target_language_model_training_lowers_loss(tmp_path):
    cfg = Qwen3Config(model_type="qwen3", vocab_size=32, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, rope=RopeConfig(theta=10000.0), tie_word_embeddings=True)
    docs = [[(s + i) % 30 for i in range(40)] for s in range(30)]  # counting: learnable
    windows = lm.pack(docs, 16, separator=31)
    assert windows.shape[1] == 17 and windows[0, 0] == 0 and windows[1, 0] == windows[0, 16]
    recipe = lm.LMRecipe(seq_len=16, batch_size=8, steps=40, lr=1e-2, warmup_ratio=0.1, eval_every=40, checkpoint_every=40)
    target = lm.init_target(cfg, 0)
    before = lm.evaluate(target, windows[:16], 8)
    trained = lm.train(target, windows, windows[:16], recipe, tmp_path)
    after = lm.evaluate(trained, windows[:16], 8)
    assert after < 0.5 * before, (before, after)
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 41)) and "val_loss" in log[-1]


installed = pytest.mark.skipif(not (assets.TARGET / "config.json").exists(), reason="the built-in pair is not installed")


@installed
def test_built_in_pair_loads_and_matches():
    target = dj.load_target()
    draft = dj.load_draft()
    dflash = dj.load_draft(assets.DFLASH_DRAFT)
    for d in (draft, dflash):
        dj.check_pair(target, d)
        np.testing.assert_array_equal(np.asarray(d.module.backbone.lm_head[...]), np.asarray(target.module.embed_tokens[...]))
    assert draft.config.markov_rank > 0 and draft.config.enable_confidence_head
    assert dflash.config.markov_rank == 0 and not dflash.config.enable_confidence_head
    assert target.stop_token_ids and target.tokenizer.chat_template


@installed
@pytest.mark.skipif(PROMPTS is None, reason="prompt sets not available")
def test_built_in_pair_heldout_prompts_are_the_untrained_head_of_each_set():
    info = json.loads((assets.ROOT / "fixture.json").read_text())
    test_counts = info["config"]["test_per_set"]
    held: dict[str, list[str]] = {}
    for line in (assets.ROOT / "heldout_prompts.jsonl").read_text().splitlines():
        r = json.loads(line)
        held.setdefault(r["set"], []).append(r["turns"][0])
    for name, prompts in held.items():
        assert len(prompts) == test_counts[name]
        assert corpus.read_prompt_set(PROMPTS / f"{name}.jsonl")[: len(prompts)] == prompts
