"""Bad requests and mismatched draft/target pairs fail with errors that name the input."""

from __future__ import annotations

import dataclasses

import pytest

import dspark_jax as dj
from dspark_jax.config import RopeConfig
from dspark_jax.errors import ConfigError, InputError
from dspark_jax.models.qwen3 import Qwen3Config
from dspark_jax.testing import synthetic

CFG = Qwen3Config(
    model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=2,
    num_kv_heads=1, head_dim=16, rope=RopeConfig(theta=1e4), max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def target():
    return dj.Target.random(CFG)


@pytest.mark.parametrize(
    "prompts, kwargs, match",
    [
        ([], {}, "prompts is empty"),
        ([[1, 2], []], {}, "prompt 1 is empty"),
        ([[1, 64]], {}, r"prompt 0 has token id\(s\) \[64\] outside the vocabulary"),
        ([[-1]], {}, "outside the vocabulary"),
        ([[1] * 40], {"max_new_tokens": 30}, "exceeds the model's capacity of 64"),
        ([[1]], {"max_new_tokens": 0}, "max_new_tokens"),
        ([[1]], {"temperature": -0.5}, "temperature"),
        ([[1]], {"top_p": 0.0}, "top_p"),
        ([[1]], {"top_k": 1.5}, "top_k"),
        ([[1]], {"confidence_threshold": 2.0}, "confidence_threshold"),
        ([[1]], {"stop_token_ids": [99]}, "stop token id 99"),
        ([[1], [2]], {"temperature": [0.5, 0.5, 0.5]}, "temperature"),
        ("hello", {}, "list of prompts"),
    ],
)
def test_bad_requests_raise_input_error(target, prompts, kwargs, match):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(InputError, match=match):
        dj.generate(target, None, prompts, **kwargs)


def test_text_prompt_without_tokenizer(target):
    with pytest.raises(InputError, match="no tokenizer"):
        dj.generate(target, None, ["hello"], max_new_tokens=2)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(vocab_size=65), "vocab_size"),
        (dict(hidden_size=48), "hidden_size"),
        (dict(target_layer_ids=(0, 2)), "last layer 2"),
        (dict(target_layer_ids=(0, 5)), "outside the target"),
        (dict(num_target_layers=4), "4-layer target"),
        (dict(mask_token_id=64), "mask_token_id"),
    ],
)
def test_mismatched_draft_is_refused(target, change, match):
    cfg = synthetic.draft_config_for(CFG, markov_rank=8)
    backbone_fields = {k: change.pop(k) for k in ("vocab_size", "hidden_size") if k in change}
    if "hidden_size" in backbone_fields:  # keep the heads consistent with the new width
        backbone_fields["head_dim"] = backbone_fields["hidden_size"] // cfg.backbone.num_heads
    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, **backbone_fields), **change)
    draft = dj.Draft.random(cfg)
    with pytest.raises(ConfigError, match=match):
        dj.generate(target, draft, [[1, 2]], max_new_tokens=4)


def test_draft_length_must_fit_the_block(target):
    draft = synthetic.random_draft(target, synthetic.draft_config_for(CFG, markov_rank=8, block_size=4))
    with pytest.raises(ConfigError, match="maximum 4"):
        dj.generate(target, draft, [[1, 2]], max_new_tokens=4, draft_length=5)
