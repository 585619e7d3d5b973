"""Bad requests and mismatched draft/target pairs fail with errors that name the input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import dspark_jax as dj
from dspark_jax.config import RopeConfig
from dspark_jax.errors import ConfigError, DSparkError, InputError
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


# ------------------------------------------------------------------------------- the boundary, table-driven

TARGET = object()  # placeholders the table's cases are resolved against
DRAFT = object()
LOOKUP = object()

# (case id, arguments that replace the defaults of a valid call, the name the error must mention)
BAD_INPUTS = [
    ("max_new_tokens inf", {"max_new_tokens": float("inf")}, "max_new_tokens"),
    ("max_new_tokens None", {"max_new_tokens": None}, "max_new_tokens"),
    ("max_new_tokens str", {"max_new_tokens": "4"}, "max_new_tokens"),
    ("max_new_tokens float", {"max_new_tokens": 4.0}, "max_new_tokens"),
    ("max_new_tokens bool", {"max_new_tokens": True}, "max_new_tokens"),
    ("max_new_tokens zero", {"max_new_tokens": 0}, "max_new_tokens"),
    ("max_new_tokens per prompt, wrong count", {"max_new_tokens": [4, 4]}, "max_new_tokens"),
    ("max_new_tokens per prompt, float", {"max_new_tokens": [2.5]}, r"max_new_tokens\[0\]"),
    ("temperature str", {"temperature": "hot"}, "temperature"),
    ("temperature nan", {"temperature": float("nan")}, "temperature"),
    ("temperature inf", {"temperature": float("inf")}, "temperature"),
    ("temperature negative", {"temperature": -0.5}, "temperature"),
    ("temperature None", {"temperature": None}, "temperature"),
    ("temperature 2-D", {"temperature": np.zeros((1, 1))}, "temperature"),
    ("top_k float", {"top_k": 1.5}, "top_k"),
    ("top_k negative", {"top_k": -1}, "top_k"),
    ("top_k str", {"top_k": "3"}, "top_k"),
    ("top_p zero", {"top_p": 0.0}, "top_p"),
    ("top_p above 1", {"top_p": 1.5}, "top_p"),
    ("top_p str", {"top_p": "0.9"}, "top_p"),
    ("seed negative", {"seed": -1}, "seed"),
    ("seed too large", {"seed": 2**32}, "seed"),
    ("seed float", {"seed": 1.5}, "seed"),
    ("seed str", {"seed": "7"}, "seed"),
    ("confidence_threshold above 1", {"confidence_threshold": 2.0}, "confidence_threshold"),
    ("confidence_threshold str", {"confidence_threshold": "high"}, "confidence_threshold"),
    ("stop_token_ids bare int", {"stop_token_ids": 2}, "stop_token_ids"),
    ("stop_token_ids outside vocabulary", {"stop_token_ids": [99]}, "stop_token_ids"),
    ("stop_token_ids float", {"stop_token_ids": [1.5]}, "stop_token_ids"),
    ("row_ids wrong count", {"row_ids": [0, 1]}, "row_ids"),
    ("row_ids scalar", {"row_ids": 5}, "row_ids"),
    ("row_ids negative", {"row_ids": [-1]}, r"row_ids\[0\]"),
    ("draft_length float", {"draft": DRAFT, "draft_length": 2.5}, "draft_length"),
    ("draft_length too long", {"draft": DRAFT, "draft_length": 9}, "draft_length"),
    ("token id float", {"prompts": [[1, 1.7, 3]]}, "prompt 0: token 1"),
    ("token id bool", {"prompts": [[True, 2]]}, "prompt 0: token 0"),
    ("token id str", {"prompts": [["a", "b"]]}, "prompt 0: token 0"),
    ("token id outside vocabulary", {"prompts": [[1, 64]]}, "prompt 0 has token id"),
    ("token id negative", {"prompts": [[-1]]}, "prompt 0 has token id"),
    ("float numpy prompt", {"prompts": [np.array([1.0, 2.0])]}, "prompt 0"),
    ("bytes prompt", {"prompts": [b"hello"]}, "prompt 0 is bytes"),
    ("dict prompt", {"prompts": [{"role": "user", "content": "hi"}]}, "prompt 0 is a dict"),
    ("None prompt", {"prompts": [[1, 2], None]}, "prompt 1"),
    ("empty prompt", {"prompts": [[1, 2], []]}, "prompt 1 is empty"),
    ("lone surrogate", {"prompts": ["bad \ud800 text"]}, "prompt 0 is not valid Unicode"),
    ("prompts one string", {"prompts": "hello"}, "prompts"),
    ("prompts bytes", {"prompts": b"hello"}, "prompts"),
    ("prompts flat ints", {"prompts": [1, 2, 3]}, "prompts is a flat list"),
    ("prompts None", {"prompts": None}, "prompts"),
    ("prompts empty", {"prompts": []}, "prompts is empty"),
    ("prompts 1-D array", {"prompts": np.array([1, 2, 3])}, "prompts"),
    ("prompt too long", {"prompts": [[1] * 40], "max_new_tokens": 30}, "prompt 0"),
    ("target is a path", {"target": "/models/Qwen3-8B"}, "target='/models/Qwen3-8B' is a path"),
    ("target is a Path", {"target": Path("/models/Qwen3-8B")}, "dj.load_target"),
    ("target is None", {"target": None}, "target"),
    ("target and draft swapped", {"target": DRAFT, "draft": TARGET}, "target is a draft"),
    ("draft is the target", {"draft": TARGET}, "draft is a target model"),
    ("draft is a path", {"draft": "/models/dspark"}, "dj.load_draft"),
    ("draft is a name", {"draft": "prompt-lookup"}, "dj.prompt_lookup"),
    ("threshold without a confidence head", {"draft": LOOKUP, "confidence_threshold": 0.5}, "confidence_threshold"),
]


@pytest.fixture(scope="module")
def models(target):
    draft = synthetic.random_draft(target, synthetic.draft_config_for(CFG, markov_rank=8, block_size=4))
    return {TARGET: target, DRAFT: draft, LOOKUP: dj.prompt_lookup(draft_length=4)}


def _call(models, change, entry=None):
    args = {"target": TARGET, "draft": None, "prompts": [[1, 2]], "max_new_tokens": 4} | change
    args = {k: next((m for key, m in models.items() if v is key), v) for k, v in args.items()}
    entry = entry or dj.generate
    return entry(args.pop("target"), args.pop("draft"), args.pop("prompts"), **args)


@pytest.mark.parametrize("case, change, name", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_an_error_naming_the_argument(models, case, change, name):
    with pytest.raises(DSparkError, match=name) as info:
        _call(models, change)
    assert isinstance(info.value, (InputError, ConfigError))


STREAM_CASES = [c for c in BAD_INPUTS if c[0] in ("max_new_tokens inf", "temperature str", "token id float", "bytes prompt",
                                                  "target is a path", "target and draft swapped")]


def test_the_table_is_large_and_each_case_distinct():
    assert len(BAD_INPUTS) >= 30 and len({c[0] for c in BAD_INPUTS}) == len(BAD_INPUTS) and len(STREAM_CASES) == 6


@pytest.mark.parametrize("case, change, name", STREAM_CASES, ids=[c[0] for c in STREAM_CASES])
def test_stream_validates_when_called(models, case, change, name):
    with pytest.raises(DSparkError, match=name):
        _call(models, change, entry=dj.stream)  # raised by the call itself, before any round is iterated


def test_numpy_values_are_accepted(models):
    target = models[TARGET]
    expected = dj.generate(target, None, [[1, 2, 3], [4, 5, 6]], max_new_tokens=3, temperature=[0.0, 0.7], top_k=[0, 5],
                           seed=[1, 2]).tokens
    variants = [
        dict(prompts=np.array([[1, 2, 3], [4, 5, 6]], np.int32)),
        dict(prompts=[np.array([1, 2, 3], np.int64), (4, 5, 6)], max_new_tokens=np.int64(3)),
        dict(temperature=np.array([0.0, 0.7], np.float32), top_k=np.array([0, 5]), seed=np.array([1, 2], np.uint32)),
        dict(max_new_tokens=[3, np.int16(3)], top_p=np.float64(1.0), row_ids=np.arange(2)),
        dict(max_new_tokens=(3, 3), row_ids=range(2)),
    ]
    for change in variants:
        args = dict(prompts=[[1, 2, 3], [4, 5, 6]], max_new_tokens=3, temperature=[0.0, 0.7], top_k=[0, 5], seed=[1, 2])
        args |= change
        assert dj.generate(target, None, args.pop("prompts"), **args).tokens == expected


def test_tiny_temperatures_are_greedy(models):
    """Below 1e-5 a temperature is greedy (the reference's threshold): no NaN from dividing by 1e-37."""
    from dspark_jax.config import SamplingParams
    from dspark_jax.engine import sampling

    logits = np.random.default_rng(0).normal(0, 5, (4, 64)).astype(np.float32)
    params = SamplingParams.create(4, temperature=[1e-37, 1e-6, 0.0, 1e-4])
    probs = np.asarray(sampling.probabilities(logits, params))
    assert np.all(np.isfinite(probs))
    np.testing.assert_array_equal(probs[:3], np.eye(64)[logits[:3].argmax(-1)])
    assert 0 < probs[3].max() <= 1
    target, draft = models[TARGET], models[DRAFT]
    prompts = [[1, 2, 3], [7, 8]]
    greedy = dj.generate(target, None, prompts, max_new_tokens=8, stop_token_ids=[]).tokens
    for d in (None, draft):
        assert dj.generate(target, d, prompts, max_new_tokens=8, stop_token_ids=[], temperature=1e-37, seed=3).tokens == greedy


@pytest.mark.parametrize(
    "extra, name",
    [
        (["--prompt", "bad \ud800 text"], "--prompt is not valid Unicode"),
        (["--prompt", "fine", "--temperature", "inf"], "temperature=inf"),
        (["--prompt", "fine", "--max-new-tokens", "-3"], "max_new_tokens=-3"),
        (["--prompt", "fine", "--seed", "-1"], "seed=-1"),
        (["--prompt", "fine", "--draft-length", "0"], "draft_length=0"),
    ],
    ids=["lone surrogate", "infinite temperature", "negative budget", "negative seed", "zero draft length"],
)
def test_cli_generate_reports_bad_input_by_name(tmp_path_factory, capsys, extra, name):
    from tiny_checkpoint import session_pair

    from dspark_jax.tools.cli import main

    target_dir, draft_dir = session_pair(tmp_path_factory)
    args = ["generate", "--target", str(target_dir), "--draft", str(draft_dir), "--dtype", "float32", "--max-new-tokens", "4"]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert "error: " in err and name in err, err
