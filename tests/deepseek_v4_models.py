"""Tiny random DeepSeek-V4 models built and saved with transformers (the independent reference), a hub-layout
copy of a saved checkpoint, and near-tie margins of the discrete choices (router top-k, indexer top-k)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

V = 64
LAYER_TYPES = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
               "compressed_sparse_attention"]

BASE = dict(
    vocab_size=V,
    hidden_size=32,
    moe_intermediate_size=16,
    num_hidden_layers=4,
    num_attention_heads=4,
    head_dim=16,
    q_lora_rank=24,
    num_experts_per_tok=2,
    n_routed_experts=8,
    o_groups=2,
    o_lora_rank=8,
    index_n_heads=8,  # >= 8 heads: the indexer scores have no ties (target_families.md §0 finding 4)
    index_head_dim=8,
    index_topk=3,  # fewer than the entries of a 40-token prompt, so the top-k decides
    sliding_window=8,
    layer_types=LAYER_TYPES,
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
    partial_rotary_factor=0.25,  # rope over the last 4 of 16 dims
    compress_rope_theta=160000.0,
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1},
    swiglu_limit=0.3,  # small enough that the clamps act on these activations
    max_position_embeddings=1024,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
)


def randomise(model, seed: int, cfg=None) -> None:
    """Every persistent tensor random: norms 1 +- 0.1; sinks, position biases, hc bases and the router bias
    N(0, 0.5^2); hc scales 1 +- 0.3; `tid2eid` distinct random experts per token; the rest N(0, 0.1^2)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    cfg = cfg or model.config
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("inv_freq"):
                continue
            if name.endswith("tid2eid"):
                rows = [torch.randperm(cfg.n_routed_experts, generator=g)[: cfg.num_experts_per_tok] for _ in range(t.shape[0])]
                t.copy_(torch.stack(rows))
            elif "norm" in name:
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
            elif name.endswith(("sinks", "position_bias", "base", "e_score_correction_bias")):
                t.copy_(0.5 * torch.randn(t.shape, generator=g))
            elif name.endswith(("scale", "hc_scale")):
                t.copy_(1 + 0.3 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))


def build(directory: Path, *, seed: int = 0, **overrides):
    """Build, randomise and save a tiny `DeepseekV4ForCausalLM` (transformers layout). Returns the torch model."""
    import torch
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    cfg = dict(BASE)
    cfg.update(overrides)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**cfg)).eval()
    randomise(model, seed)
    model.save_pretrained(directory)
    return model


def hub_copy(src: Path, dst: Path, model) -> None:
    """`dst`: the model of `src` in the hub layout (DeepSeek's names, no `model.` prefix, per-expert tensors) with
    a hub-dialect `config.json` (`compress_ratios`, `num_hash_layers`, `qk_rope_head_dim`, `rope_scaling`).
    Written from transformers' in-memory names by the renames documented in target_families.md §2."""
    import torch
    from safetensors.torch import save_file

    from dspark_jax.models.deepseek_v4.checkpoint import to_hub

    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in model.state_dict().items():
        value = value.detach().clone().contiguous()
        hub = to_hub(key)
        if hub.endswith("experts.gate_up_proj"):
            F = value.shape[1] // 2
            for e in range(value.shape[0]):
                tensors[hub.replace("gate_up_proj", f"{e}.w1.weight")] = value[e, :F].clone()
                tensors[hub.replace("gate_up_proj", f"{e}.w3.weight")] = value[e, F:].clone()
        elif hub.endswith("experts.down_proj"):
            for e in range(value.shape[0]):
                tensors[hub.replace("down_proj", f"{e}.w2.weight")] = value[e].clone()
        else:
            tensors[hub] = value
    with torch.no_grad():
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    rates = cfg.pop("compress_rates")
    ratio = {"sliding_attention": 0, "compressed_sparse_attention": 4,
             "heavily_compressed_attention": rates["heavily_compressed_attention"]}
    cfg["compress_ratios"] = [ratio[t] for t in cfg.pop("layer_types")] + [0]  # + the MTP layer's entry
    cfg["num_hash_layers"] = cfg.pop("mlp_layer_types").count("hash_moe")
    cfg["qk_rope_head_dim"] = int(cfg["head_dim"] * cfg.pop("partial_rotary_factor"))
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope["main"]["rope_theta"]
    cfg["compress_rope_theta"] = rope["compress"]["rope_theta"]
    cfg["rope_scaling"] = {k: v for k, v in rope["compress"].items()
                           if k in ("type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow")}
    cfg["rope_scaling"]["type"] = "yarn"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def margins(hf, ids) -> dict[str, float]:
    """Smallest gap, over `ids`, between the last kept and the first dropped candidate of transformers' routers
    (corrected scores) and lightning indexers (finite scores only)."""
    import torch

    out = {"router": np.inf, "indexer": np.inf}

    def router_hook(module, args, result):
        logits = result[0].double()
        choice = torch.nn.functional.softplus(logits).sqrt() + module.e_score_correction_bias.double()
        top = choice.sort(dim=-1, descending=True)[0]
        k = module.top_k
        out["router"] = min(out["router"], float((top[:, k - 1] - top[:, k]).min()))

    def scorer_hook(module, args, result):
        k = module_topk[0]
        s = result.double().sort(dim=-1, descending=True)[0]
        if s.shape[-1] > k:
            a, b = s[..., k - 1], s[..., k]
            finite = torch.isfinite(a) & torch.isfinite(b)
            if finite.any():
                out["indexer"] = min(out["indexer"], float((a - b)[finite].min()))

    module_topk = [hf.config.index_topk]
    handles = []
    for m in hf.modules():
        name = type(m).__name__
        if name == "DeepseekV4TopKRouter":
            handles.append(m.register_forward_hook(router_hook))
    # the scorer returns unmasked scores; mask the future here the way the indexer does
    for layer in hf.model.layers:
        comp = layer.self_attn.compressor
        if comp is not None and hasattr(comp, "indexer"):
            ratio = comp.indexer.compress_rate

            def hook(module, args, result, ratio=ratio):
                T = result.shape[1]
                pos = torch.arange(T)[:, None]
                masked = result.masked_fill(torch.arange(result.shape[-1])[None, :] >= (pos + 1) // ratio, float("-inf"))
                scorer_hook(module, args, masked)

            handles.append(comp.indexer.scorer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            hf(torch.as_tensor(ids, dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    return out


# --- FP8 (UE8M0 block scales) and FP4 e2m1 experts, as DeepSeek-V4 hub checkpoints store them ---------------

FP8_NAMES = (".attn.wq_a.weight", ".attn.wq_b.weight", ".attn.wkv.weight", ".attn.wo_a.weight", ".attn.wo_b.weight",
             ".shared_experts.w1.weight", ".shared_experts.w2.weight", ".shared_experts.w3.weight")
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)


def _pow2_scale(amax: np.ndarray, top: float) -> np.ndarray:
    """UE8M0 scales: the smallest power of two with `amax / scale <= top`."""
    return np.exp2(np.ceil(np.log2(np.maximum(amax, 1e-30) / top))).astype(np.float32)


def quantize_fp8_ue8m0(w: np.ndarray, block=(128, 128)) -> tuple[np.ndarray, np.ndarray]:
    import ml_dtypes

    out, inp = w.shape
    go, gi = -(-out // block[0]), -(-inp // block[1])
    scale = np.zeros((go, gi), np.float32)
    q = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
    for i in range(go):
        for j in range(gi):
            blk = w[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            scale[i, j] = _pow2_scale(np.abs(blk).max(), 448.0)
            q[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] = (blk / scale[i, j]).astype(q.dtype)
    return q, scale.astype(ml_dtypes.float8_e8m0fnu)


def quantize_fp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Packed e2m1 pairs `[out, in / 2]` (int8, low nibble first) and UE8M0 scales `[out, in / 32]`."""
    import ml_dtypes

    out, inp = w.shape
    blocks = -(-inp // 32)
    scale = np.zeros((out, blocks), np.float32)
    codes = np.zeros(w.shape, np.uint8)
    for j in range(blocks):
        blk = w[:, j * 32 : (j + 1) * 32]
        scale[:, j] = _pow2_scale(np.abs(blk).max(axis=1), 6.0)
        x = blk / scale[:, j : j + 1]
        mag = np.abs(np.abs(x)[..., None] - E2M1).argmin(-1).astype(np.uint8)
        codes[:, j * 32 : (j + 1) * 32] = mag | (np.signbit(x).astype(np.uint8) << 3)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8).view(np.int8)
    return packed, scale.astype(ml_dtypes.float8_e8m0fnu)


def quantize_v4(src: Path, dst: Path) -> None:
    """`dst`: the hub checkpoint `src` with FP8 e4m3 attention / shared-expert weights (128x128 UE8M0 `.scale`)
    and FP4 routed experts (1x32 UE8M0 `.scale`), and the matching `quantization_config` / `expert_dtype`."""
    from converters.safetensors_io import iter_checkpoint, save_file

    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value, _ in iter_checkpoint(src):
        value = np.asarray(value, np.float32) if value.dtype.kind == "f" else np.asarray(value)
        base = key[: -len(".weight")]
        if ".ffn.experts." in key:
            tensors[key], tensors[base + ".scale"] = quantize_fp4(value)
        elif key.endswith(FP8_NAMES):
            tensors[key], tensors[base + ".scale"] = quantize_fp8_ue8m0(value)
        else:
            tensors[key] = value
    save_file(tensors, dst / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                  "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    cfg["expert_dtype"] = "fp4"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


def hf_dequantized_copy(src: Path, dst: Path) -> None:
    """`dst`: the quantised checkpoint `src` with every (weight, scale) pair replaced by transformers' own
    dequantisation (`Fp8Dequantize`), float32, and no quantization_config."""
    import torch
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    from converters.safetensors_io import iter_checkpoint, save_file

    dst.mkdir(parents=True, exist_ok=True)
    raw = {k: np.asarray(v) for k, v, _ in iter_checkpoint(src)}
    op = Fp8Dequantize(None)
    out = {}
    for key, value in raw.items():
        if key.endswith(".scale") and key[: -len(".scale")] + ".weight" in raw:
            continue
        scale = raw.get(key[: -len(".weight")] + ".scale") if key.endswith(".weight") else None
        if scale is None:
            out[key] = value
            continue
        s = torch.from_numpy(scale.view(np.uint8).copy()).view(torch.float8_e8m0fnu)
        if value.dtype == np.int8:
            q = torch.from_numpy(value.copy())
        else:
            q = torch.from_numpy(value.view(np.uint8).copy()).view(torch.float8_e4m3fn)
        out[key] = op._dequantize_one(q, s, output_dtype=torch.float32).numpy()
    save_file(out, dst / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config")
    cfg.pop("expert_dtype")
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


# --- the V4 MTP module (`mtp.0`), built from transformers' V4 modules --------------------------------------


class MTPReference:
    """DeepSeek-V4's MTP block (the official `MTPBlock` formula, docs/deepseek.md §10) assembled from
    transformers' own V4 modules: a `DeepseekV4DecoderLayer` (sliding attention, routed MoE), a
    `DeepseekV4HyperHead`, RMSNorms and two projections; the target's embedding and head are shared."""

    def __init__(self, hf, seed: int):
        import copy

        import torch
        from transformers.models.deepseek_v4 import modeling_deepseek_v4 as m

        cfg = copy.deepcopy(hf.config)
        L = cfg.num_hidden_layers
        cfg.layer_types = list(cfg.layer_types) + ["sliding_attention"]
        cfg.mlp_layer_types = list(cfg.mlp_layer_types) + ["moe"]
        D = cfg.hidden_size
        self.hf, self.L = hf, L
        self.layer = m.DeepseekV4DecoderLayer(cfg, L).eval()
        self.hc_head = m.DeepseekV4HyperHead(cfg).eval()
        self.enorm, self.hnorm, self.norm = (m.DeepseekV4RMSNorm(D, cfg.rms_norm_eps) for _ in range(3))
        self.e_proj = torch.nn.Linear(D, D, bias=False)
        self.h_proj = torch.nn.Linear(D, D, bias=False)
        self.modules = {"": self.layer, "hc_head.": self.hc_head, "enorm.": self.enorm, "hnorm.": self.hnorm,
                        "norm.": self.norm, "e_proj.": self.e_proj, "h_proj.": self.h_proj}
        for i, mod in enumerate(self.modules.values()):
            randomise(mod, seed + i, cfg)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for norm in (self.enorm, self.hnorm, self.norm):
                norm.weight.copy_(1 + 0.1 * torch.randn(norm.weight.shape, generator=g))

    def hub_tensors(self) -> dict:
        """The module in the hub layout, `mtp.0.*` (per-expert tensors)."""
        from dspark_jax.models.deepseek_v4.checkpoint import to_hub

        out = {}
        for prefix, mod in self.modules.items():
            for key, value in mod.state_dict().items():
                value = value.detach().clone().contiguous()
                if prefix == "hc_head.":
                    out["mtp.0." + key.replace("hc_", "hc_head_")] = value
                    continue
                hub = "mtp.0." + to_hub("layers.0." + prefix + key).removeprefix("layers.0.")
                if hub.endswith("experts.gate_up_proj"):
                    F = value.shape[1] // 2
                    for e in range(value.shape[0]):
                        out[hub.replace("gate_up_proj", f"{e}.w1.weight")] = value[e, :F].clone()
                        out[hub.replace("gate_up_proj", f"{e}.w3.weight")] = value[e, F:].clone()
                elif hub.endswith("experts.down_proj"):
                    for e in range(value.shape[0]):
                        out[hub.replace("down_proj", f"{e}.w2.weight")] = value[e].clone()
                else:
                    out[hub] = value
        return out

    def streams(self, ids):
        """The target's raw last-layer streams `[B, S, n, D]` (before its hc_head) for `ids [B, S]`."""
        import torch

        got = {}
        handle = self.hf.model.layers[-1].register_forward_hook(lambda mod, a, out: got.setdefault("h", out))
        try:
            with torch.no_grad():
                self.hf(torch.as_tensor(ids, dtype=torch.long))
        finally:
            handle.remove()
        return got["h"]

    def run(self, tokens, hidden):
        """Logits and output streams of the block over rows `(hidden[i], tokens[i])` at positions 0.. (one
        sequence, no cache: causal within the sliding window)."""
        import torch

        cfg = self.layer.self_attn.config
        tokens = torch.as_tensor(tokens, dtype=torch.long)[None]
        S = tokens.shape[1]
        with torch.no_grad():
            e = self.enorm(self.hf.model.embed_tokens(tokens))
            x = self.e_proj(e).unsqueeze(2) + self.h_proj(self.hnorm(hidden[None]))
            pos = torch.arange(S)[None]
            pe = {t: self.hf.model.rotary_emb(x, position_ids=pos, layer_type=t) for t in ("main", "compress")}
            d = pos[0][:, None] - pos[0][None, :]
            mask = torch.where((d >= 0) & (d < cfg.sliding_window), 0.0, float("-inf"))[None, None]
            g = self.layer(x, position_embeddings=pe, position_ids=pos, attention_mask=mask, input_ids=tokens, cache=None)
            logits = self.hf.lm_head(self.norm(self.hc_head(g)))
        return logits[0], g[0]
