"""Gemma 4 targets against transformers on tiny random models (float32, highest precision).

Two multimodal checkpoints are built and saved with transformers: a `gemma4` model exercising sliding and
full layers, proportional RoPE, K=V global attention, per-layer inputs, KV sharing, the double-wide MLP and
MoE (with a vision tower that the loader must skip), and a `gemma4_unified` (12B-style) model. Every
persistent tensor is randomised (norm weights and scales around 1, `layer_scalar` != 1).
"""

from __future__ import annotations

import copy
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import dspark_jax as dj
from converters import safetensors_io
from dspark_jax.config import read_json
from dspark_jax.errors import CheckpointError, ConfigError
from dspark_jax.models import registry
from dspark_jax.models.gemma4 import FULL, SLIDING
from dspark_jax.models.gemma4.config import parse
from dspark_jax.tokenizer import Tokenizer

# The tolerance target_families.md recommends for Gemma: sandwich norms re-normalise small sub-block outputs,
# so transformers' own fp32-vs-fp64 error on these models is a few 1e-5 (absolute) in the deepest layers.
TOL = 1e-4
V, D, WINDOW, SEQ = 80, 32, 4, 40
K = 4  # verify blocks of K + 1 = 5 tokens, longer than the window
COMMON = dict(
    vocab_size=V,
    hidden_size=D,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    global_head_dim=16,  # proportional RoPE over 16 dims, 2 of 8 frequencies non-zero
    num_global_key_value_heads=1,
    attention_k_eq_v=True,
    sliding_window=WINDOW,
    final_logit_softcapping=1.5,
    max_position_embeddings=128,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=0,
)
VARIANTS = {
    # E2B/E4B/26B-A4B features at once: layers 3 and 4 reuse the K/V of layers 1 and 2.
    "gemma4": dict(
        layer_types=[SLIDING, SLIDING, FULL, SLIDING, FULL],
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=V,
        num_kv_shared_layers=2,
        use_double_wide_mlp=True,
        enable_moe_block=True,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=12,
    ),
    "gemma4_unified": dict(layer_types=[SLIDING, FULL, SLIDING, FULL]),
}
for _v in VARIANTS.values():
    _v["num_hidden_layers"] = len(_v["layer_types"])


def _randomise(model, seed: int) -> None:
    """Every persistent tensor: norm weights and router scales 1 +- 0.1, layer scalars in [0.5, 1.5], the rest N(0, 0.05^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name == "lm_head.weight":  # tied to the embedding
                continue
            if "norm" in name or name.endswith(("router.scale", "per_expert_scale")):
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
            elif name.endswith("layer_scalar"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            else:
                t.copy_(0.05 * torch.randn(t.shape, generator=g))


def _build(kind: str, directory):
    """A randomised multimodal model saved under `directory / "multimodal"`, its text-only export under
    `directory / "text"` (transformers-5 config dialect) and a hub-dialect copy under `directory / "hub"`."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "gemma4":
        text_cfg = tf.Gemma4TextConfig(**COMMON, **VARIANTS[kind])
        vision = tf.Gemma4VisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
        )
        hf = tf.Gemma4ForConditionalGeneration(
            tf.Gemma4Config(text_config=text_cfg, vision_config=vision, audio_config=None)
        )
        text_cls = tf.Gemma4ForCausalLM
    else:
        text_cfg = tf.Gemma4UnifiedTextConfig(**COMMON, **VARIANTS[kind])
        vision = tf.Gemma4UnifiedVisionConfig(mm_embed_dim=D, mm_posemb_size=8, output_proj_dims=D)
        hf = tf.Gemma4UnifiedForConditionalGeneration(
            tf.Gemma4UnifiedConfig(text_config=text_cfg, vision_config=vision, audio_config=None)
        )
        text_cls = tf.Gemma4UnifiedForCausalLM
    hf.eval()
    _randomise(hf, seed=len(kind))
    hf.generation_config.eos_token_id = None
    hf.save_pretrained(directory / "multimodal")

    prefix = "model.language_model."
    text = text_cls(text_cfg).eval()
    state = {"model." + k[len(prefix) :]: v for k, v in hf.state_dict().items() if k.startswith(prefix)}
    missing, unexpected = text.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    text.save_pretrained(directory / "text")

    shutil.copytree(directory / "text", directory / "hub")
    config = json.loads((directory / "hub" / "config.json").read_text())
    del config["per_layer_config"]
    config.update(
        global_head_dim=COMMON["global_head_dim"], num_global_key_value_heads=COMMON["num_global_key_value_heads"]
    )
    (directory / "hub" / "config.json").write_text(json.dumps(config, indent=2))
    return hf


@pytest.fixture(scope="module", params=list(VARIANTS))
def case(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf = _build(request.param, directory)
    ids = np.random.default_rng(1).integers(0, V, (2, SEQ))
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(ids), output_hidden_states=True)
    target = dj.load_target(directory / "multimodal", dtype="float32")
    return dict(
        name=request.param,
        dir=directory,
        hf=hf,
        target=target,
        ids=ids,
        logits=ref.logits.numpy(),
        hidden=[h.numpy() for h in ref.hidden_states],
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "capture"))
def _forward(graphdef, params, tokens, lengths, cache, num_valid, capture):
    model = nnx.merge(graphdef, params)
    hidden, cache, features = model(tokens, lengths, cache, capture=capture, num_valid=num_valid)
    return model.logits(hidden), cache, features


def _run(target, tokens, lengths, cache, num_valid=None):
    L = target.config.num_layers
    logits, cache, features = _forward(
        target.graphdef,
        target.params,
        jnp.asarray(tokens, jnp.int32),
        jnp.asarray(lengths, jnp.int32),
        cache,
        None if num_valid is None else jnp.asarray(num_valid, jnp.int32),
        tuple(range(L + 1)),
    )
    return np.asarray(logits), cache, np.split(np.asarray(features), L + 1, axis=-1)


def _parse(path):
    return parse(read_json(path), str(path))


def _layer_cache(target, cache, layer: int):
    """The `[B, S, G, H]` keys/values of HF layer `layer` in the stacked (heads-major) cache."""
    (_, g, _, q), r = target.module.layer_map().slot(layer)
    return np.swapaxes(cache[g][q].k[r], 1, 2), np.swapaxes(cache[g][q].v[r], 1, 2)


def _max_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def test_config_dialects_and_wrappers_parse_alike(case):
    """Multimodal config (nested text_config), text-only transformers-5 export (`per_layer_config`) and
    hub dialect (`global_head_dim`, `num_global_key_value_heads`) describe the same decoder."""
    from transformers import AutoConfig

    d = case["dir"]
    hub_hf = AutoConfig.from_pretrained(d / "hub").to_dict()
    text_hf = AutoConfig.from_pretrained(d / "text").to_dict()
    assert hub_hf["per_layer_config"] == text_hf["per_layer_config"]  # our hub-style file means the same to HF
    parsed = [_parse(d / sub / "config.json") for sub in ("multimodal", "text", "hub")]
    assert parsed[0] == parsed[1] == parsed[2]
    cfg = parsed[0]
    assert cfg.model_type == case["name"]
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.global_head_dim, cfg.num_global_kv_heads) == (8, 2, 16, 1)
    assert cfg.layer_types == tuple(VARIANTS[case["name"]]["layer_types"]) and cfg.sliding_window == WINDOW
    assert cfg.rope_full.rope_type == "proportional" and cfg.rope_full.partial_rotary_factor == 0.25
    if case["name"] == "gemma4":
        assert cfg.cache_layers == (0, 1, 2) and [cfg.kv_source(i) for i in (3, 4)] == [1, 2]
        assert cfg.hidden_size_per_layer_input == 8 and cfg.enable_moe_block and cfg.use_double_wide_mlp
    else:
        assert cfg.hidden_size_per_layer_input == 0 and not cfg.enable_moe_block


def test_config_errors(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "gemma4", "vocab_size": 8}))
    with pytest.raises(ConfigError, match="text_config"):
        _parse(path)
    path.write_text(json.dumps({"model_type": "gemma3"}))
    with pytest.raises(ConfigError, match="gemma4_unified"):
        _parse(path)
    with pytest.raises(ConfigError, match="gemma4_unified"):
        registry.by_model_type("gemma3", str(path))
    assert registry.by_model_type("gemma4_unified_text").name == "gemma4"


def test_forward_matches_transformers(case):
    target, L = case["target"], case["target"].config.num_layers
    cache = target.module.init_cache(2, SEQ, max_block=K + 1)  # the cached test's shapes: one compiled program
    logits, _, hidden = _run(target, case["ids"], [0, 0], cache, num_valid=[SEQ, SEQ])
    errors = [_max_err(hidden[i], case["hidden"][i]) for i in range(L + 1)]
    print(
        f"{case['name']}: max |logits err| {_max_err(logits, case['logits']):.2e}, hidden errs {[f'{e:.1e}' for e in errors]}"
    )
    np.testing.assert_allclose(logits, case["logits"], rtol=TOL, atol=TOL)
    for i in range(L + 1):
        np.testing.assert_allclose(hidden[i], case["hidden"][i], rtol=TOL, atol=TOL, err_msg=f"hidden state {i}")


def test_text_only_and_hub_exports_load_the_same_weights(case):
    ours = nnx.to_flat_state(case["target"].params)
    for sub in ("text", "hub"):
        other = dict(nnx.to_flat_state(dj.load_target(case["dir"] / sub, dtype="float32").params))
        assert set(other) == {p for p, _ in ours}
        for path, var in ours:
            np.testing.assert_array_equal(
                np.asarray(var.get_value()), np.asarray(other[path].get_value()), err_msg=str(path)
            )


def test_bf16_embedding_scale_is_rounded_like_transformers(case):
    """sqrt(32) = 5.657 becomes 5.656 in bf16; transformers multiplies in the weight dtype by the rounded scale."""
    hf = copy.deepcopy(case["hf"]).to(torch.bfloat16)
    target = dj.load_target(case["dir"] / "multimodal", dtype="bfloat16")
    ids = case["ids"][:, :16]
    with torch.no_grad():
        ref = hf.model.language_model.embed_tokens(torch.as_tensor(ids)).float().numpy()
    ours = np.asarray(target.module.embed(jnp.asarray(ids, jnp.int32)).astype(jnp.float32))
    np.testing.assert_array_equal(ours, ref)
    table = np.asarray(target.params["embed_tokens"].get_value().astype(jnp.float32))[ids]
    unrounded = np.asarray(jnp.asarray(table * np.sqrt(D), jnp.bfloat16).astype(jnp.float32))
    assert (unrounded != ref).any(), "the test must tell the rounded scale from the exact one"


def test_cached_blocks_at_ragged_offsets_match_full_forward(case):
    """Ragged prefill (one prompt longer than the sliding ring), then verify-style blocks of K + 1 = 5 > W
    tokens at per-row offsets whose tails are wrong tokens and only partly committed, then one-token steps."""
    _check_cached_blocks(case["target"], case["ids"], case["logits"], case["hidden"], case["name"])


def _check_cached_blocks(target, ids, ref_logits, ref_hidden, name, tols=None):
    L = target.config.num_layers
    tols = tols or [TOL] * (L + 1)
    rng = np.random.default_rng(3)
    cache = target.module.init_cache(2, SEQ, max_block=K + 1)
    ring = WINDOW + K
    kinds = target.config.layer_types
    assert {_layer_cache(target, cache, i)[0].shape[1] for i in target.config.cache_layers if kinds[i] == SLIDING} == {ring}
    prompt_lens = np.array([5, ring + 3])
    tokens = np.zeros((2, SEQ), np.int32)  # padded to the full-forward length: one compiled program for both
    for b in range(2):
        tokens[b, : prompt_lens[b]] = ids[b, : prompt_lens[b]]
    logits, cache, hidden = _run(target, tokens, [0, 0], cache, num_valid=prompt_lens)
    worst = 0.0

    def check(b, got_logits, got_hidden, start, n, what):
        nonlocal worst
        sl = slice(start, start + n)
        np.testing.assert_allclose(got_logits[:n], ref_logits[b, sl], rtol=TOL, atol=TOL, err_msg=what)
        for i in range(L + 1):
            np.testing.assert_allclose(
                got_hidden[i][:n], ref_hidden[i][b, sl], rtol=TOL, atol=tols[i], err_msg=f"{what}, hidden {i}"
            )
        worst = max(worst, _max_err(got_logits[:n], ref_logits[b, sl]))

    for b in range(2):
        check(b, logits[b], [h[b] for h in hidden], 0, prompt_lens[b], f"prefill row {b}")
    lengths = prompt_lens.copy()
    rounds = 0
    while lengths.max() + K + 1 <= SEQ - 3:
        accepted = rng.integers(0, K + 1, 2)
        block = rng.integers(0, V, (2, K + 1))
        for b in range(2):
            block[b, : accepted[b] + 1] = ids[b, lengths[b] : lengths[b] + accepted[b] + 1]
        logits, cache, hidden = _run(target, block, lengths, cache)
        for b in range(2):
            check(
                b,
                logits[b],
                [h[b] for h in hidden],
                lengths[b],
                accepted[b] + 1,
                f"round {rounds} row {b} at {lengths[b]}",
            )
        lengths += accepted + 1
        rounds += 1
    assert rounds >= 4
    for _ in range(3):  # plain one-token decode on top of the same cache
        logits, cache, hidden = _run(target, ids[np.arange(2), lengths][:, None], lengths, cache)
        for b in range(2):
            check(b, logits[b], [h[b] for h in hidden], lengths[b], 1, f"decode row {b} at {lengths[b]}")
        lengths += 1
    print(f"{name}: {rounds} partial-commit rounds, worst cached logits err {worst:.2e}")


# Deeper text-only models whose layers scan in groups of more than one repetition (`layers.stack`).
SCANNED = {
    # [5 sliding, 1 full] x 2 with per-layer inputs and MoE: one group, its 6-layer pattern run twice.
    "one_group": dict(
        layer_types=([SLIDING] * 5 + [FULL]) * 2,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=V,
        enable_moe_block=True,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=12,
    ),
    # A periodic KV-sharing tail: layers 4-7 (double-wide MLPs) reuse the K/V of layers 2 (sliding) and 3
    # (full), which sit in the second repetition of the first group.
    "shared_tail": dict(
        layer_types=[SLIDING, FULL] * 4,
        num_kv_shared_layers=4,
        use_double_wide_mlp=True,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=V,
    ),
}
GROUPS = {"one_group": [(0, 6, 2)], "shared_tail": [(0, 2, 2), (4, 2, 2)]}  # (first layer, period, n)


@pytest.mark.parametrize("name", list(SCANNED))
def test_scanned_groups_match_transformers(name, tmp_path):
    """Twelve and eight layers deep, randomised hidden states grow and transformers' own fp32 error grows with
    them (a few 1e-4 in the deepest layers, above TOL), so the reference is transformers in float64: logits
    within TOL, each hidden state within TOL or twice transformers' own fp32 error, whichever is larger."""
    import transformers as tf

    torch.manual_seed(0)
    variant = dict(SCANNED[name], num_hidden_layers=len(SCANNED[name]["layer_types"]))
    hf = tf.Gemma4ForCausalLM(tf.Gemma4TextConfig(**COMMON, **variant)).eval()
    _randomise(hf, seed=7)
    hf.save_pretrained(tmp_path)
    target = dj.load_target(tmp_path, dtype="float32")
    model = target.module
    assert [(g.start, g.period, g.n) for g in model.groups] == GROUPS[name]
    if name == "one_group":
        assert len(model.groups) == 1 and model.groups[0].n == 2
    else:
        assert model.kv_sources() == {SLIDING: (0, 0, 1), FULL: (0, 1, 1)}

    ids = np.random.default_rng(1).integers(0, V, (2, SEQ))
    hf64 = copy.deepcopy(hf).double()
    hf64.set_experts_implementation("eager")  # the grouped-matmul experts kernel has no float64
    with torch.no_grad():
        ref32 = hf(input_ids=torch.as_tensor(ids), output_hidden_states=True)
        ref = hf64(input_ids=torch.as_tensor(ids), output_hidden_states=True)
    ref_logits, ref_hidden = ref.logits.numpy(), [h.numpy() for h in ref.hidden_states]
    L = target.config.num_layers
    tols = [max(TOL, 2 * _max_err(a, b)) for a, b in zip(ref32.hidden_states, ref_hidden)]
    logits, _, hidden = _run(target, ids, [0, 0], model.init_cache(2, SEQ, max_block=K + 1), num_valid=[SEQ, SEQ])
    np.testing.assert_allclose(logits, ref_logits, rtol=TOL, atol=TOL)
    for i in range(L + 1):
        np.testing.assert_allclose(hidden[i], ref_hidden[i], rtol=TOL, atol=tols[i], err_msg=f"hidden state {i}")
    _check_cached_blocks(target, ids, ref_logits, ref_hidden, name, tols)


def test_greedy_generation_matches_transformers(case):
    prompts = [case["ids"][0, :5].tolist(), case["ids"][1, :9].tolist()]
    ours = dj.generate(case["target"], None, prompts, max_new_tokens=14, stop_token_ids=[]).tokens
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = case["hf"].generate(
                input_ids=torch.tensor([prompt]), max_new_tokens=14, do_sample=False, pad_token_id=0
            )
        assert got == out[0, len(prompt) :].tolist()


def _write_checkpoint(src, dst, tensors):
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    safetensors_io.save_file(tensors, dst / "model.safetensors")
    return dst


def test_prefixes_fail_loudly_and_shared_kv_weights_are_ignored(case, tmp_path):
    """A wrong prefix or a missing tensor is a CheckpointError naming the key, never random parameters."""
    src = case["dir"] / "multimodal"
    tensors = {k: v for k, v, _ in safetensors_io.iter_checkpoint(src)}
    text = {k: v for k, v in tensors.items() if k.startswith("model.language_model.")}
    assert len(text) < len(tensors)  # the vision tower is there and skipped

    old_layout = {"language_model.model." + k[len("model.language_model.") :]: v for k, v in text.items()}
    with pytest.raises(CheckpointError, match=r"language_model\.model\.") as err:
        dj.load_target(_write_checkpoint(src, tmp_path / "old", old_layout), dtype="float32")
    assert "model.language_model." in str(err.value)
    no_prefix = {k[len("model.language_model.") :]: v for k, v in text.items()}
    with pytest.raises(CheckpointError, match=r"'(layers|embed_tokens|norm)"):
        dj.load_target(_write_checkpoint(src, tmp_path / "bare", no_prefix), dtype="float32")
    renamed = {k.replace("model.language_model.", "model.text_model."): v for k, v in tensors.items()}
    with pytest.raises(CheckpointError, match=r"model\.text_model\."):
        dj.load_target(_write_checkpoint(src, tmp_path / "renamed", renamed), dtype="float32")
    missing = dict(tensors)
    del missing["model.language_model.layers.1.layer_scalar"]
    with pytest.raises(CheckpointError, match=r"layers\.1\.layer_scalar"):
        dj.load_target(_write_checkpoint(src, tmp_path / "missing", missing), dtype="float32")

    cfg = case["target"].config
    sharing = [i for i in range(cfg.num_layers) if cfg.kv_source(i) != i]
    if sharing:  # hub checkpoints may still carry K/V weights of KV-sharing layers; transformers drops them
        extra = dict(tensors)
        for i in sharing:
            H, G = cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
            extra[f"model.language_model.layers.{i}.self_attn.k_proj.weight"] = np.ones((G * H, D), np.float32)
            extra[f"model.language_model.layers.{i}.self_attn.k_norm.weight"] = np.ones((H,), np.float32)
        loaded = dj.load_target(_write_checkpoint(src, tmp_path / "extra", extra), dtype="float32")
        same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), loaded.params, case["target"].params)
        assert all(jax.tree.leaves(same))


# A Gemma-4-style chat template, written for this test: `<|turn>role ... <turn|>` turns, the assistant
# speaks as "model", a system turn comes first, and the generation prompt opens a model turn.
CHAT_TEMPLATE = """{{- bos_token -}}
{%- set ns = namespace(first=0) -%}
{%- macro turn(role, text) -%}{{- '<|turn>' + role + '\\n' + (text | trim) + '<turn|>\\n' -}}{%- endmacro -%}
{%- if messages[0]['role'] == 'system' -%}
{{- turn('system', messages[0]['content']) -}}{%- set ns.first = 1 -%}
{%- endif -%}
{%- for message in messages[ns.first:] -%}
{%- if message['content'] is not string -%}{{- raise_exception('content must be text') -}}{%- endif -%}
{{- turn('model' if message['role'] == 'assistant' else message['role'], message['content']) -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}{%- endif -%}"""


def test_gemma_chat_template_through_the_generic_tokenizer(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    specials = ["<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>"]
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["Hello there, how are you?", "Be brief. The answer is 42."] * 4, trainer=trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<bos>", "eos_token": "<turn|>", "pad_token": "<pad>"})
    )

    t = Tokenizer.from_directory(tmp_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hello there "}]
    text = t.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
    assert text == "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHello there<turn|>\n<|turn>model\n"
    ids = t.encode(text)
    marker = [t.token_id(s) for s in ("<bos>", "<|turn>", "<turn|>")]
    assert ids[0] == marker[0] and ids.count(marker[1]) == 3 and ids.count(marker[2]) == 2
    assert t.decode(ids, skip_special_tokens=True) == "system\nBe brief.\nuser\nHello there\nmodel\n"
    reply = t.apply_chat_template([*messages, {"role": "assistant", "content": "42"}], add_generation_prompt=False)
    assert reply.endswith("<|turn>model\n42<turn|>\n")
    with pytest.raises(dj.InputError, match="content must be text"):
        t.apply_chat_template([{"role": "user", "content": ["not", "text"]}])
