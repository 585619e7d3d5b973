"""DeepSeek-V4 targets against transformers on a tiny random model (float32, highest precision).

The model has one layer of each attention type (sliding only with hash routing, CSA with the lightning indexer,
HCA), a sliding window shorter than the prompts, an indexer top-k smaller than the number of compressed entries
(8 indexer heads, so the scores have no ties), a SwiGLU clamp that acts, and every persistent tensor random.
The discrete choices of the test inputs are checked to have no near-ties, so both implementations choose the
same experts and entries and the comparison is of numerics.

* Prefill logits and every hidden state (the hc streams) equal transformers'.
* The hub layout (DeepSeek's names, hub config dialect), transformers' `save_pretrained` output and
  transformers' in-memory names load to identical parameters and configs.
* Caches: ragged prefill, then blocks at per-row offsets whose suffixes are rejected (their tokens wrong), some
  completing compression windows (CSA and HCA) inside the rejected part, committed by length only: every
  committed position's logits equal transformers' full forward of the true sequence.
* Greedy generation equals transformers'; greedy speculative decoding with scripted drafts (oracle, mixed,
  random; the engine and `dj.generate` unchanged) equals plain greedy decoding.
"""

from __future__ import annotations

import functools
import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from deepseek_v4_models import build, hub_copy, margins
from flax import nnx

import dspark_jax as dj
from dspark_jax.config import read_json
from dspark_jax.engine.contracts import Proposal
from dspark_jax.errors import CheckpointError, ConfigError
from dspark_jax.models.deepseek_v4.config import parse

TOL = 1e-5
SEQ = 40
LAYERS = dict(num_hidden_layers=3, layer_types=["sliding_attention", "compressed_sparse_attention",
                                                "heavily_compressed_attention"],
              mlp_layer_types=["hash_moe", "moe", "moe"])


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    directory = tmp_path_factory.mktemp("v4")
    hf = build(directory, seed=0, **LAYERS)
    return dict(hf=hf, dir=directory, target=dj.load_target(directory, dtype="float32"))


@functools.partial(jax.jit, static_argnames=("graphdef", "capture", "streams"))
def _forward(graphdef, params, tokens, lengths, cache, num_valid, capture=(), streams=False):
    model = nnx.merge(graphdef, params)
    hidden, cache, features = model(tokens, lengths, cache, capture=capture, num_valid=num_valid, streams=streams)
    return model.logits(hidden), hidden, cache, features


def _hf(hf, ids, **kw):
    with torch.no_grad():
        return hf(torch.as_tensor(ids, dtype=torch.long), **kw)


def test_prefill_logits_and_every_hidden_state(case):
    hf, target = case["hf"], case["target"]
    ids = np.random.default_rng(1).integers(0, target.config.vocab_size, (2, SEQ))
    gaps = margins(hf, ids)
    assert min(gaps.values()) > 1e-5, f"fixture has a near-tie in a discrete choice ({gaps}); pick another seed"
    ref = _hf(hf, ids, output_hidden_states=True)
    L, D = target.config.num_layers, target.config.hidden_size
    logits, hidden, _, features = _forward(target.graphdef, target.params, jnp.asarray(ids, jnp.int32),
                                           jnp.zeros(2, jnp.int32), target.module.init_cache(2, 64), None,
                                           capture=tuple(range(L)), streams=True)
    assert np.abs(np.asarray(logits) - ref.logits.numpy()).max() <= TOL
    streams = np.asarray(features).reshape(2, SEQ, L, 4, D)
    for i in range(L):
        err = np.abs(streams[:, :, i] - ref.hidden_states[i].numpy()).max()
        assert err <= TOL, f"hidden state {i} differs by {err}"
    assert np.abs(np.asarray(hidden) - ref.hidden_states[L].numpy()).max() <= TOL  # the final norm (index L)


def _params(target) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(target.params)}


def test_three_weight_layouts_and_both_config_dialects_load_alike(case, tmp_path):
    hf, target = case["hf"], case["target"]
    hub = tmp_path / "hub"
    hub_copy(case["dir"], hub, hf)
    hub_cfg = read_json(hub / "config.json")
    assert "compress_ratios" in hub_cfg and "layer_types" not in hub_cfg and "rope_parameters" not in hub_cfg
    assert parse(hub_cfg, "hub") == target.config
    from safetensors.numpy import load_file

    keys = set(load_file(hub / "model.safetensors"))
    assert {"embed.weight", "hc_head_fn", "layers.0.attn.kv_norm.weight", "layers.1.attn.indexer.compressor.ape",
            "layers.2.ffn.experts.7.w2.weight", "layers.0.ffn.gate.tid2eid"} <= keys
    mem = tmp_path / "in_memory"  # transformers' own parameter names, fused experts
    mem.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, mem / "model.safetensors")
    (mem / "config.json").write_text((case["dir"] / "config.json").read_text())
    ours = _params(target)
    for other in (dj.load_target(hub, dtype="float32"), dj.load_target(mem, dtype="float32")):
        theirs = _params(other)
        assert theirs.keys() == ours.keys()
        for p in ours:
            np.testing.assert_array_equal(theirs[p], ours[p], err_msg=str(p))
    tid = np.asarray(dict(nnx.to_flat_state(target.params))[("groups", 0, "layers", 0, "ffn", "tid2eid")].get_value())
    assert tid.dtype == np.int32
    np.testing.assert_array_equal(tid[0], hf.model.layers[0].mlp.gate.tid2eid.numpy())


def test_cached_blocks_with_rejected_suffixes_equal_the_full_forward(case):
    """Ragged prefill, then blocks at per-row offsets whose suffix is wrong and not committed."""
    hf, target = case["hf"], case["target"]
    cfg = target.config
    rng = np.random.default_rng(2)
    full = rng.integers(0, cfg.vocab_size, (2, 48))
    assert min(margins(hf, full).values()) > 1e-5
    ref = _hf(hf, full).logits.numpy()
    prompt = np.array([7, 13])
    tokens = np.zeros((2, 16), np.int32)
    for b in range(2):
        tokens[b, : prompt[b]] = full[b, : prompt[b]]
    K = 4
    cache = target.module.init_cache(2, 64, max_block=K + 1)
    assert cache[0][0].window.shape[3] < 32, "the rings should wrap around within this test"
    L = cfg.num_layers
    logits, _, cache, features = _forward(target.graphdef, target.params, jnp.asarray(tokens), jnp.zeros(2, jnp.int32),
                                          cache, jnp.asarray(prompt, jnp.int32), capture=(L, 1, 0))
    # the engine's features: index i < L the mean over the hc streams, index L the final-norm output
    states = _hf(hf, full, output_hidden_states=True).hidden_states
    expected = [states[L].numpy(), states[1].numpy().mean(2), states[0].numpy()[:, :, 0]]
    for b in range(2):
        n = prompt[b]
        np.testing.assert_allclose(np.asarray(logits)[b, :n], ref[b, :n], atol=TOL, rtol=0)
        for ours, theirs in zip(np.split(np.asarray(features)[b, :n], 3, axis=-1), expected):
            np.testing.assert_allclose(ours, theirs[b, :n], atol=TOL, rtol=0)
    lengths = prompt.copy()
    rejected_window_ends = {cfg.csa_ratio: 0, cfg.hca_ratio: 0}
    for commit in (1, 2, 5, 0, 3, 1, 4, 0, 2):  # one block shape: one compilation
        T = K + 1
        block = np.stack([full[b, lengths[b] : lengths[b] + T] for b in range(2)])
        block[:, commit:] = (block[:, commit:] + 17) % cfg.vocab_size  # the rejected suffix is wrong
        logits, _, cache, _ = _forward(target.graphdef, target.params, jnp.asarray(block, jnp.int32),
                                       jnp.asarray(lengths, jnp.int32), cache, None)
        for b in range(2):
            err = np.abs(np.asarray(logits)[b, :commit] - ref[b, lengths[b] : lengths[b] + commit]).max(initial=0)
            assert err <= TOL, f"block of {T} at {lengths[b]} committing {commit}: {err}"
            for m in rejected_window_ends:
                rejected_window_ends[m] += sum((p + 1) % m == 0 for p in range(lengths[b] + commit, lengths[b] + T))
        lengths += commit
    assert all(rejected_window_ends.values()), rejected_window_ends


# --- generation (end to end: slow) -----------------------------------------------------------------------

# the third prompt is prefilled in three chunks of 16 (windows of 4 and 8 positions completed across chunks)
PROMPTS = [[3, 9, 27, 5, 1], list(range(40, 51)), [(7 * i + 3) % 64 for i in range(37)]]
NEW = 16
CHUNK = 16


@pytest.fixture(scope="module")
def plain(case):
    return dj.generate(case["target"], None, PROMPTS, max_new_tokens=NEW, stop_token_ids=[], prefill_chunk=CHUNK).tokens


@pytest.mark.slow
def test_greedy_generation_equals_transformers(case, plain):
    hf = case["hf"]
    for prompt, ours in zip(PROMPTS, plain):
        with torch.no_grad():
            out = hf.generate(torch.as_tensor([prompt]), max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW)
        assert list(out[0, len(prompt) :].numpy()) == ours


class ScriptedProposer(nnx.Module):
    """Drafts `script[row, lengths + 1 : lengths + 1 + K]`: a fixed continuation per row (no model)."""

    def __init__(self, script: np.ndarray, K: int):
        self.script = nnx.Variable(jnp.asarray(script, jnp.int32))
        self.max_draft_length = K
        self.feature_indices = ()
        self.has_confidence = False

    def check_target(self, target_config) -> None:
        del target_config

    def init_state(self, batch: int, capacity: int):
        return jnp.zeros((batch,), jnp.int32)

    def extend(self, state, tokens, features, lengths):
        return state

    def propose(self, state, anchor, lengths, sampling, keys, K: int) -> Proposal:
        script = self.script[...]
        B = anchor.shape[0]
        rows = jnp.clip(jnp.arange(B), 0, script.shape[0] - 1)
        idx = jnp.clip(lengths[:, None] + 1 + jnp.arange(K)[None, :], 0, script.shape[1] - 1)
        return Proposal(script[rows[:, None], idx], None, jnp.full((B,), K, jnp.int32), None)


def _scripts(plain, vocab: int) -> dict:
    width = max(len(p) for p in PROMPTS) + NEW + 16
    oracle = np.zeros((len(PROMPTS), width), np.int32)
    for b, (p, out) in enumerate(zip(PROMPTS, plain)):
        seq = list(p) + list(out)
        oracle[b, : len(seq)] = seq
    rng = np.random.default_rng(7)
    mixed = np.where(rng.random(oracle.shape) < 0.6, oracle, (oracle + 1 + rng.integers(0, vocab - 1, oracle.shape)) % vocab)
    return {"oracle": oracle, "mixed": mixed, "random": rng.integers(0, vocab, oracle.shape)}


@pytest.mark.slow
def test_greedy_speculative_equals_plain_greedy(case, plain):
    """Every round verifies a block of K + 1 = 5 positions and commits by length, so windows of 4 (CSA) and 8
    (HCA) are completed inside rejected suffixes again and again (mixed and random drafts)."""
    target = case["target"]
    K = 4
    # every drafted token is verified (an engine with a cost-based schedule is asked for fixed rounds)
    fixed = {"schedule": "fixed"} if "schedule" in inspect.signature(dj.generate).parameters else {}
    for name, script in _scripts(plain, target.config.vocab_size).items():
        draft = dj.Draft.of_module(ScriptedProposer(script, K), None, jnp.float32)
        result = dj.generate(target, draft, PROMPTS, max_new_tokens=NEW, stop_token_ids=[], draft_length=K,
                             prefill_chunk=CHUNK, **fixed)
        assert result.tokens == plain, name
        tau = result.stats.mean_acceptance_length
        if name == "oracle":
            assert tau > K - 0.5, tau
        elif name == "random":
            assert tau < 1.5, tau
        else:
            assert 1.2 < tau < K + 1, tau


def test_bfloat16_keeps_float32_parameters_and_an_int32_hash_table(case):
    target = dj.load_target(case["dir"], dtype="bfloat16")
    dtypes = {p: v.get_value().dtype for p, v in nnx.to_flat_state(target.params)}
    fp32 = ("attn_norm", "ffn_norm", "q_norm", "kv_norm", "norm", "attn_sink", "ape", "bias", "fn", "base", "scale",
            "hc_head_fn", "hc_head_base", "hc_head_scale")
    for path, dtype in dtypes.items():
        if path[-1] == "tid2eid":
            assert dtype == jnp.int32
        elif path[-1] in fp32:
            assert dtype == jnp.float32, path
        else:
            assert dtype == jnp.bfloat16, path


@pytest.mark.slow
def test_bfloat16_follows_the_float32_reference(case):
    hf = case["hf"]
    target = dj.load_target(case["dir"], dtype="bfloat16")
    ids = np.random.default_rng(1).integers(0, target.config.vocab_size, (2, SEQ))
    logits, _, _, _ = _forward(target.graphdef, target.params, jnp.asarray(ids, jnp.int32), jnp.zeros(2, jnp.int32),
                               target.module.init_cache(2, 64), None)
    ref = _hf(hf, ids).logits.numpy()
    ours = np.asarray(logits)
    assert np.abs(ours - ref).max() < 0.1
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.9


# --- strict errors ----------------------------------------------------------------------------------------


def test_unknown_variants_and_bad_configs_are_refused(case, tmp_path):
    cfg = read_json(case["dir"] / "config.json")
    for key, value, match in [
        ("scoring_func", "softmax", "scoring_func='softmax' is not supported"),
        ("num_key_value_heads", 2, "one shared key/value head"),
        ("layer_types", ["sliding_attention", "full_attention", "sliding_attention"], "not DeepSeek-V4 layer types"),
        ("o_groups", 3, "o_groups=3 must divide"),
        ("n_shared_experts", 2, "one shared expert"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse({**cfg, key: value}, "config.json")
    hub = {k: v for k, v in cfg.items() if k not in ("layer_types", "compress_rates")}
    with pytest.raises(ConfigError, match="compress_ratios has 2 entries"):
        parse({**hub, "compress_ratios": [0, 4]}, "config.json")
    with pytest.raises(ConfigError, match="at most one other positive ratio"):
        parse({**hub, "compress_ratios": [0, 8, 16]}, "config.json")


def test_missing_and_unexpected_tensors_are_named(case, tmp_path):
    from safetensors.numpy import load_file, save_file

    directory = case["dir"]
    tensors = load_file(directory / "model.safetensors")
    broken = tmp_path / "missing"
    broken.mkdir()
    (broken / "config.json").write_text((directory / "config.json").read_text())
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.attn.indexer.weights_proj.weight"},
              broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"layers\.1\.attn\.indexer\.weights_proj\.weight"):
        dj.load_target(broken, dtype="float32")
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "config.json").write_text((directory / "config.json").read_text())
    save_file({**tensors, "model.layers.0.attn.compressor.wkv.weight": np.zeros((32, 32), np.float32),
               "mtp.0.e_proj.weight": np.zeros((32, 32), np.float32)}, extra / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.0.attn.compressor.wkv.weight"):
        dj.load_target(extra, dtype="float32")
    cfg = json.loads((directory / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1  # `mtp.*` keys belong to the MTP proposer: skipped, not refused


# --- FP8 (UE8M0) and FP4 storage -------------------------------------------------------------------------


def test_fp4_unpacking_and_ue8m0_scales_by_hand():
    import ml_dtypes

    from converters import fp8

    packed = np.array([[0x2F, 0x91]], np.uint8).view(np.int8)  # nibbles (low first): 0xF, 0x2, 0x1, 0x9
    np.testing.assert_array_equal(fp8.unpack_fp4(packed), [[-6.0, 1.0, 0.5, -0.5]])
    scale = np.array([[128]], np.uint8).view(ml_dtypes.float8_e8m0fnu)  # 2^(128 - 127)
    np.testing.assert_array_equal(fp8.dequantize_fp4(packed, scale), [[-12.0, 2.0, 1.0, -1.0]])
    w = np.zeros((2, 40), np.int8)  # 80 unpacked values: blocks of 32, 32 and a partial 16
    s = np.array([[127, 129, 126], [130, 127, 127]], np.uint8).view(ml_dtypes.float8_e8m0fnu)
    w[:, :] = 0x22  # 1.0, 1.0
    np.testing.assert_array_equal(fp8.dequantize_fp4(w, s)[0], [1.0] * 32 + [4.0] * 32 + [0.5] * 16)


@pytest.fixture(scope="module")
def quantized(case, tmp_path_factory):
    from deepseek_v4_models import hf_dequantized_copy, quantize_v4

    root = tmp_path_factory.mktemp("v4_quant")
    hub_copy(case["dir"], root / "hub", case["hf"])
    quantize_v4(root / "hub", root / "fp8_fp4")
    hf_dequantized_copy(root / "fp8_fp4", root / "reference")
    return root


def test_fp8_and_fp4_checkpoint_dequantises_like_transformers(quantized):
    """A hub checkpoint with FP8 (128x128 UE8M0) attention weights and FP4 experts loads to exactly the
    weights transformers' own dequantisation gives (written out as float32 and loaded unquantised)."""
    from converters.safetensors_io import iter_checkpoint

    kinds = {str(v.dtype) for _, v, _ in iter_checkpoint(quantized / "fp8_fp4")}
    assert {"float8_e4m3fn", "float8_e8m0fnu", "int8"} <= kinds
    ours = _params(dj.load_target(quantized / "fp8_fp4", dtype="float32"))
    reference = _params(dj.load_target(quantized / "reference", dtype="float32"))
    unquantized = _params(dj.load_target(quantized / "hub", dtype="float32"))
    assert ours.keys() == reference.keys()
    changed = 0
    for p in ours:
        np.testing.assert_array_equal(ours[p], reference[p], err_msg=str(p))
        changed += not np.array_equal(ours[p], unquantized[p])
    assert changed >= 8, "the quantised checkpoint should differ from the float one in its quantised weights"


def _rewrite(directory, change):
    from converters.safetensors_io import iter_checkpoint, save_file

    tensors = {k: np.asarray(v).copy() for k, v, _ in iter_checkpoint(directory)}
    change(tensors)
    save_file(tensors, directory / "model.safetensors")


def test_fp8_fp4_strict_errors(quantized, tmp_path):
    import shutil

    src = quantized / "fp8_fp4"
    expert = "layers.1.ffn.experts.3.w2"

    missing = shutil.copytree(src, tmp_path / "missing")
    _rewrite(missing, lambda t: t.pop(expert + ".scale"))
    with pytest.raises(CheckpointError, match=r"missing FP8 scale.*experts\.3\.w2\.scale"):
        dj.load_target(missing, dtype="float32")

    up = "layers.1.ffn.experts.3.w1.weight"  # [16, 32] unpacked: 16 bytes and one scale per row
    repacked = shutil.copytree(src, tmp_path / "packing")  # one value per byte: the scales no longer match
    _rewrite(repacked, lambda t: t.__setitem__(up, np.repeat(t[up], 2, axis=1)))
    with pytest.raises(CheckpointError, match=r"experts\.3\.w1\.weight.*packing does not match"):
        dj.load_target(repacked, dtype="float32")

    for field, value, error, match in [
        ("scale_fmt", "e5m0", CheckpointError, "scale_fmt='e5m0' is not supported"),
        ("fmt", "e5m2", CheckpointError, "fmt='e5m2' is not supported"),
        ("expert_dtype", "fp2", ConfigError, "expert_dtype='fp2' is not supported"),
    ]:
        other = shutil.copytree(src, tmp_path / f"bad_{field}")
        cfg = json.loads((other / "config.json").read_text())
        if field == "expert_dtype":
            cfg[field] = value
        else:
            cfg["quantization_config"][field] = value
        (other / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(error, match=match):
            dj.load_target(other, dtype="float32")

    undeclared = shutil.copytree(src, tmp_path / "undeclared")
    cfg = json.loads((undeclared / "config.json").read_text())
    del cfg["quantization_config"]
    (undeclared / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="declares no quantization_config"):
        dj.load_target(undeclared, dtype="float32")
