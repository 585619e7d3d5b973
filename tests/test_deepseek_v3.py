"""DeepSeek-V3 targets against transformers on tiny random models (float32, highest precision).

Variants: low-rank queries with YaRN (mscale != mscale_all_dim, so both the cos/sin factor and the squared
softmax mscale matter) and interleaved RoPE, one dense layer then MoE layers; and full-rank queries
(`q_lora_rank` None) with default rotate-half RoPE and two dense layers. Every persistent tensor is random,
the router bias included; the routing of the test inputs is checked to have no near-ties, so expert choices
are the same in both implementations and the comparison is of numerics. Also: the latent cache (decode,
ragged blocks at per-row offsets, rejected blocks), greedy generation, FP8 checkpoints and strict errors.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from deepseek_models import build, fp8_copy, quantize_fp8
from flax import nnx

import dspark_jax as dj
from dspark_jax.config import read_json
from dspark_jax.errors import CheckpointError, ConfigError
from dspark_jax.layers.params import Init
from dspark_jax.models.deepseek_v3 import DeepseekV3Config
from dspark_jax.models.deepseek_v3 import model as v3_model
from dspark_jax.models.deepseek_v3.config import parse

TOL = 1e-5
SEQ = 40  # crosses YaRN's original 32 positions; longer than ABSORB_MAX_BLOCK (expanded prefill)
VARIANTS = {
    "q_lora_yarn": dict(
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.8, "mscale_all_dim": 1.0},
    ),
    "full_rank_q": dict(q_lora_rank=None, rope_interleave=False, first_k_dense_replace=2, num_hidden_layers=4),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf = build(directory, seed=len(request.param), **VARIANTS[request.param])
    return hf, dj.load_target(directory, dtype="float32"), request.param, directory


@functools.partial(jax.jit, static_argnames=("graphdef", "capture"))
def _forward(graphdef, params, tokens, lengths, cache, num_valid, capture):
    model = nnx.merge(graphdef, params)
    hidden, cache, features = model(tokens, lengths, cache, capture=capture, num_valid=num_valid)
    return model.logits(hidden), cache, features


def _run(target, tokens, lengths, cache, capture=()):
    logits, cache, features = _forward(target.graphdef, target.params, jnp.asarray(tokens, jnp.int32),
                                       jnp.asarray(lengths, jnp.int32), cache, None, capture)
    return np.asarray(logits), cache, features


def _hf_forward(hf, ids):
    with torch.no_grad():
        return hf(torch.as_tensor(ids, dtype=torch.long), output_hidden_states=True)


def _routing_margin(hf, ids) -> float:
    """Smallest gap, over the test inputs, between what transformers' router keeps and what it drops (the
    k-th vs (k+1)-th expert among the kept groups, and the last kept vs first dropped group)."""
    cfg = hf.config
    G, E, k = cfg.n_group, cfg.n_routed_experts, cfg.num_experts_per_tok
    margins = []

    def hook(module, args, out):
        logits = out[0].double()
        choice = logits.sigmoid() + module.e_score_correction_bias.double()
        group = choice.view(-1, G, E // G).topk(2, dim=-1)[0].sum(-1).sort(dim=-1, descending=True)[0]
        margins.append(float((group[:, cfg.topk_group - 1] - group[:, cfg.topk_group]).min()))
        kept = choice.view(-1, G, E // G).clone()
        top_groups = choice.view(-1, G, E // G).topk(2, dim=-1)[0].sum(-1).topk(cfg.topk_group, dim=-1)[1]
        mask = torch.zeros(kept.shape[:2], dtype=torch.bool).scatter_(1, top_groups, True)
        ranked = kept.masked_fill(~mask[..., None], -1e9).view(-1, E).sort(dim=-1, descending=True)[0]
        margins.append(float((ranked[:, k - 1] - ranked[:, k]).min()))

    handles = [m.register_forward_hook(hook) for m in hf.modules() if type(m).__name__ == "DeepseekV3TopkRouter"]
    try:
        _hf_forward(hf, ids)
    finally:
        for h in handles:
            h.remove()
    return min(margins) if margins else np.inf


def test_prefill_logits_and_every_hidden_state(pair):
    hf, target, name, _ = pair
    ids = np.random.default_rng(1).integers(0, target.config.vocab_size, (2, SEQ))
    assert _routing_margin(hf, ids) > 1e-5, "fixture has a near-tie in routing; pick another seed"
    ref = _hf_forward(hf, ids)
    L = target.config.num_layers
    logits, _, features = _run(target, ids, [0, 0], target.module.init_cache(2, 64), tuple(range(L + 1)))
    assert np.abs(logits - ref.logits.numpy()).max() <= TOL, name
    ours = np.split(np.asarray(features), L + 1, axis=-1)
    for i in range(L + 1):
        err = np.abs(ours[i] - ref.hidden_states[i].numpy()).max()
        assert err <= TOL, f"{name}: hidden state {i} differs by {err}"


def test_absorbed_prefill_equals_expanded(pair):
    """A prompt short enough to stay in the latent space gives the same logits as transformers."""
    hf, target, name, _ = pair
    ids = np.random.default_rng(5).integers(0, target.config.vocab_size, (2, v3_model.ABSORB_MAX_BLOCK))
    logits, _, _ = _run(target, ids, [0, 0], target.module.init_cache(2, 32))
    assert np.abs(logits - _hf_forward(hf, ids).logits.numpy()).max() <= TOL, name


def test_cached_decode_and_blocks_at_per_row_offsets(pair):
    """Prefill ragged prompts, then blocks of different lengths at each row's own offset."""
    hf, target, name, _ = pair
    rng = np.random.default_rng(2)
    full = rng.integers(0, target.config.vocab_size, (2, 34))
    assert _routing_margin(hf, full) > 1e-5
    ref = _hf_forward(hf, full).logits.numpy()
    prompt_lens = np.array([7, 12])
    tokens = np.zeros((2, 20), np.int32)  # the padded prefill block is expanded, later blocks absorbed
    for b in range(2):
        tokens[b, : prompt_lens[b]] = full[b, : prompt_lens[b]]
    logits, cache, _ = _run(target, tokens, [0, 0], target.module.init_cache(2, 64))
    for b in range(2):
        np.testing.assert_allclose(logits[b, : prompt_lens[b]], ref[b, : prompt_lens[b]], atol=TOL, rtol=0)
    lengths = prompt_lens.copy()
    for T in (1, 5, 1, 3, 8):
        block = np.stack([full[b, lengths[b] : lengths[b] + T] for b in range(2)])
        logits, cache, _ = _run(target, block, lengths, cache)
        for b in range(2):
            err = np.abs(logits[b] - ref[b, lengths[b] : lengths[b] + T]).max()
            assert err <= TOL, f"{name}: block of {T} at offset {lengths[b]} differs by {err}"
        lengths += T


def test_rejected_block_rolls_back(pair):
    """Write-ahead: a verify block past the committed length that is then rejected leaves no trace."""
    hf, target, name, _ = pair
    rng = np.random.default_rng(3)
    full = rng.integers(0, target.config.vocab_size, (2, 24))
    ref = _hf_forward(hf, full).logits.numpy()
    _, cache, _ = _run(target, full[:, :10], [0, 0], target.module.init_cache(2, 32))
    junk = rng.integers(0, target.config.vocab_size, (2, 6))
    _, cache, _ = _run(target, junk, [10, 10], cache)  # verified, nothing accepted
    _, cache, _ = _run(target, np.stack([full[0, 10:13], junk[1, :3]]), [10, 10], cache)  # row 0 keeps 2, row 1 none
    lengths = np.array([12, 10])
    block = np.stack([full[b, lengths[b] : lengths[b] + 4] for b in range(2)])
    logits, _, _ = _run(target, block, lengths, cache)
    for b in range(2):
        assert np.abs(logits[b] - ref[b, lengths[b] : lengths[b] + 4]).max() <= TOL, name


def test_greedy_generation_equals_transformers(pair):
    hf, target, name, _ = pair
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, target.config.vocab_size, n).tolist() for n in (5, 11, 3)]
    ours = dj.generate(target, None, prompts, max_new_tokens=20, stop_token_ids=[]).tokens
    for prompt, tokens in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, min_new_tokens=20)
        assert tokens == out[0, len(prompt) :].tolist(), name


def test_latent_cache_holds_576_numbers_per_token_at_full_size():
    """DeepSeek-V3 671B shapes: the cache of each layer is `kv_lora_rank + qk_rope_head_dim` = 576 per token,
    where expanded keys and values would hold 128 heads x (192 + 128) = 40960."""
    cfg = DeepseekV3Config(
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_layers=61,
        num_heads=128, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, q_lora_rank=1536,
        moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8,
        topk_group=4, routed_scaling_factor=2.5, first_k_dense_replace=3,
    )
    model = nnx.eval_shape(lambda: v3_model.DeepseekV3Model(cfg, Init(nnx.Rngs(0), jnp.bfloat16)))
    cache = jax.eval_shape(lambda: model.init_cache(1, 1024))
    per_token = sum(x.size for x in jax.tree.leaves(cache)) // 1024
    assert per_token == 61 * 576
    assert [g.n for g in model.groups] == [3, 58]  # one dense scan, one MoE scan


def test_router_stays_float32_in_bfloat16(pair):
    _, _, _, directory = pair
    target = dj.load_target(directory, dtype="bfloat16")
    flat = dict(nnx.to_flat_state(target.params))
    routers = [p for p in flat if p[-1] in ("router", "e_score_correction_bias")]
    assert routers and all(flat[p].get_value().dtype == jnp.float32 for p in routers)
    assert flat[("embed_tokens",)].get_value().dtype == jnp.bfloat16


def test_bfloat16_follows_the_float32_reference(pair):
    """bf16 weights and activations (router fp32): logits close to transformers' fp32 ones, same top-1
    almost everywhere, for the expanded prefill and the absorbed decode blocks alike. (An expert choice may
    flip in bf16 at a few tokens, so the bound is on the typical error, not the worst.)"""
    hf, _, name, directory = pair
    target = dj.load_target(directory, dtype="bfloat16")
    full = np.random.default_rng(6).integers(0, target.config.vocab_size, (2, 30))
    ref = _hf_forward(hf, full).logits.numpy()
    prefill, cache, _ = _run(target, full[:, :20], [0, 0], target.module.init_cache(2, 32))
    block, _, _ = _run(target, full[:, 20:], [20, 20], cache)
    ours = np.concatenate([prefill, block], axis=1)
    scale = np.abs(ref).max()
    err = np.abs(ours - ref).max(axis=-1)
    assert np.median(err) <= 0.01 * scale and (err > 0.05 * scale).mean() <= 0.1, name
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9, name


def test_config_dialects_parse_alike(pair):
    """The hub dialect (`rope_theta` + `rope_scaling`, `num_nextn_predict_layers`) means the same as the
    transformers-5 one (`rope_parameters`)."""
    _, target, _, directory = pair
    cfg = read_json(directory / "config.json")
    hub = dict(cfg)
    rp = dict(hub.pop("rope_parameters"))
    hub["rope_theta"] = rp.pop("rope_theta")
    if rp.get("rope_type", "default") != "default":
        hub["rope_scaling"] = rp
    hub.pop("num_mtp_layers", None)
    assert parse(hub, "hub") == target.config


# --- FP8 -----------------------------------------------------------------------------------------------


def test_fp8_block_dequantisation_by_hand():
    """3 x 5 weight, 2 x 2 blocks: scale grid 2 x 3, partial blocks on the bottom row and right column."""
    from converters import fp8

    q = np.array([[1, 2, 3, 4, 5], [-1, -2, -3, -4, -5], [0.5, 1.5, 2.5, 3.5, 448]], np.float32)
    q = q.astype(fp8.FP8_DTYPES[0])
    scale = np.array([[1, 10, 100], [0.5, 0.25, 2]], np.float32)
    got = fp8.dequantize(q, scale, (2, 2))
    expected = np.array(
        [[1, 2, 30, 40, 500], [-1, -2, -30, -40, -500], [0.25, 0.75, 0.625, 0.875, 896]], np.float32
    )
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="expected \\(2, 3\\)"):
        fp8.dequantize(q, scale[:, :2], (2, 2))


def test_fp8_dequantisation_equals_transformers():
    """On shapes transformers' `Fp8Dequantize` accepts (multiples of the block) both give the same weights."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    from converters import fp8

    w = np.random.default_rng(0).standard_normal((256, 384)).astype(np.float32)
    q, s = quantize_fp8(w, (128, 128))
    ours = fp8.dequantize(q, s, (128, 128))
    theirs = Fp8Dequantize(None)._dequantize_one(
        torch.from_numpy(q.view(np.uint8)).view(torch.float8_e4m3fn), torch.from_numpy(s), torch.float32
    )
    np.testing.assert_array_equal(ours, theirs.numpy())


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    base = tmp_path_factory.mktemp("fp8")
    build(base / "fp32", seed=7, **VARIANTS["q_lora_yarn"])
    fp8_copy(base / "fp32", base / "fp8", (16, 16))  # kv_a_proj 20 x 32: a partial block row
    return base


def test_fp8_checkpoint_dequantises_while_loading(fp8_pair):
    """The FP8 checkpoint loads exactly as the float32 checkpoint of its element-by-element dequantised
    weights, and the model equals transformers loading that float32 checkpoint."""
    from transformers import DeepseekV3ForCausalLM

    fp8 = dj.load_target(fp8_pair / "fp8", dtype="float32")
    ref = dj.load_target(fp8_pair / "fp8_dequantised", dtype="float32")
    ours, theirs = dict(nnx.to_flat_state(fp8.params)), dict(nnx.to_flat_state(ref.params))
    assert ours.keys() == theirs.keys()
    for path in ours:
        np.testing.assert_array_equal(np.asarray(ours[path].get_value()), np.asarray(theirs[path].get_value()), err_msg=str(path))
    hf = DeepseekV3ForCausalLM.from_pretrained(fp8_pair / "fp8_dequantised").eval()
    ids = np.random.default_rng(8).integers(0, hf.config.vocab_size, (2, 24))
    logits, _, _ = _run(fp8, ids, [0, 0], fp8.module.init_cache(2, 32))
    assert np.abs(logits - _hf_forward(hf, ids).logits.numpy()).max() <= TOL


def _rewrite(directory, edit):
    """Apply `edit` to the {key: array} of `directory`'s checkpoint and write it back."""
    from converters.safetensors_io import SafetensorsFile, save_file

    f = SafetensorsFile(directory / "model.safetensors")
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    f.close()
    edit(tensors)
    save_file(tensors, directory / "model.safetensors")


def test_fp8_strict_errors(fp8_pair, tmp_path):
    base = fp8_pair
    key = "model.layers.0.self_attn.o_proj.weight"

    missing = tmp_path / "missing"
    shutil.copytree(base / "fp8", missing)
    _rewrite(missing, lambda t: t.pop(key + "_scale_inv"))
    with pytest.raises(CheckpointError, match="missing FP8 scale.*o_proj.weight_scale_inv"):
        dj.load_target(missing, dtype="float32")

    wrong = tmp_path / "wrong"
    shutil.copytree(base / "fp8", wrong)
    _rewrite(wrong, lambda t: t.__setitem__(key + "_scale_inv", t[key + "_scale_inv"][:, :1]))
    with pytest.raises(CheckpointError, match="o_proj.weight_scale_inv.*expected"):
        dj.load_target(wrong, dtype="float32")

    orphan = tmp_path / "orphan"
    shutil.copytree(base / "fp8", orphan)
    _rewrite(orphan, lambda t: t.__setitem__("model.layers.0.self_attn.nothing.weight_scale_inv", np.ones((1, 1), np.float32)))
    with pytest.raises(CheckpointError, match="without their weights"):
        dj.load_target(orphan, dtype="float32")

    undeclared = tmp_path / "undeclared"
    shutil.copytree(base / "fp8", undeclared)
    cfg = json.loads((undeclared / "config.json").read_text())
    del cfg["quantization_config"]
    (undeclared / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="declares no quantization_config"):
        dj.load_target(undeclared, dtype="float32")

    other = tmp_path / "other_method"
    shutil.copytree(base / "fp8", other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "gptq"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quant_method='gptq' is not supported"):
        dj.load_target(other, dtype="float32")


# --- strict config / layout errors ----------------------------------------------------------------------


def test_unknown_variants_are_refused(pair, tmp_path):
    _, _, _, directory = pair
    base = read_json(directory / "config.json")
    with pytest.raises(ConfigError, match="model_type 'deepseek_v2' is not supported"):
        target_dir = tmp_path / "v2"
        shutil.copytree(directory, target_dir)
        (target_dir / "config.json").write_text(json.dumps({**base, "model_type": "deepseek_v2"}))
        dj.load_target(target_dir, dtype="float32")
    for field, value in [("scoring_func", "softmax"), ("topk_method", "group_limited_greedy"), ("moe_layer_freq", 2),
                         ("attention_bias", True)]:
        with pytest.raises(ConfigError, match=field):
            parse({**base, field: value}, "config.json")


def test_mtp_layers_are_skipped_by_the_target_but_nothing_else(pair, tmp_path):
    """A target load reads past `model.layers.{L}` (the MTP module) and refuses a layer beyond it."""
    _, target, _, directory = pair
    L = target.config.num_layers

    def add(t, layer):
        t[f"model.layers.{layer}.enorm.weight"] = np.ones(target.config.hidden_size, np.float32)

    with_mtp = tmp_path / "with_mtp"
    shutil.copytree(directory, with_mtp)
    _rewrite(with_mtp, lambda t: add(t, L))
    dj.load_target(with_mtp, dtype="float32")

    beyond = tmp_path / "beyond"
    shutil.copytree(directory, beyond)
    _rewrite(beyond, lambda t: add(t, L + 1))
    with pytest.raises(CheckpointError, match=f"model.layers.{L + 1}.enorm.weight"):
        dj.load_target(beyond, dtype="float32")


def test_missing_tensor_is_named(pair, tmp_path):
    _, _, _, directory = pair
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    _rewrite(broken, lambda t: t.pop("model.layers.1.self_attn.kv_b_proj.weight"))
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.kv_b_proj.weight"):
        dj.load_target(broken, dtype="float32")


def test_config_dataclass_is_hashable_and_replaceable(pair):
    _, target, _, _ = pair
    hash(target.config)
    assert dataclasses.replace(target.config, num_mtp_layers=0).num_mtp_layers == 0
