"""Tiny random DeepSeek-V3 models built and saved with transformers (independent references), optionally with
an MTP module written in the hub layout (`model.layers.{L}.*`, DeepSeek-V3 `README_WEIGHTS.md`), and FP8
block quantisation of a saved checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np

V = 64

BASE = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=6,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
    max_position_embeddings=128,
    rope_theta=10000.0,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
)


def randomise(module, seed: int) -> None:
    """Every parameter and the router bias buffers: norm weights 1 +- 0.1, the rest N(0, 0.1^2)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("inv_freq"):
                continue
            if "norm" in name:
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))


def build(directory: Path, *, seed: int = 0, mtp: bool = False, **overrides):
    """Build, randomise and save a tiny `DeepseekV3ForCausalLM`; with `mtp`, add a random MTP module to the
    checkpoint in the hub layout. Returns the torch model."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = dict(BASE)
    cfg.update(overrides)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg)).eval()
    randomise(model, seed)
    model.save_pretrained(directory)
    if mtp:
        add_mtp(directory, model, seed + 100)
    return model


def add_mtp(directory: Path, model, seed: int) -> None:
    """Write a random MTP module (transformers' `MtpModel` layout, randomised) into `directory`'s checkpoint
    under `model.layers.{L}.*` with per-expert tensors, as the hub stores it."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers.modeling_layers import MtpModel

    L = model.config.num_hidden_layers
    mtp = MtpModel(model, 1).eval()
    randomise(mtp.layers, seed)
    p = f"model.layers.{L}."
    tensors = {}
    for key, value in mtp.layers.state_dict().items():
        key = key.removeprefix("0.")
        value = value.detach().clone()
        if key == "post_norm.weight":
            key = "shared_head.norm.weight"
        key = key.removeprefix("mtp_block.")
        if key == "mlp.experts.gate_up_proj":
            F = value.shape[1] // 2
            for e in range(value.shape[0]):
                tensors[f"{p}mlp.experts.{e}.gate_proj.weight"] = value[e, :F].clone()
                tensors[f"{p}mlp.experts.{e}.up_proj.weight"] = value[e, F:].clone()
        elif key == "mlp.experts.down_proj":
            for e in range(value.shape[0]):
                tensors[f"{p}mlp.experts.{e}.down_proj.weight"] = value[e].clone()
        else:
            tensors[p + key] = value
    tensors[p + "embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
    tensors[p + "shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    path = Path(directory) / "model.safetensors"
    main = load_file(path)
    main.update(tensors)
    with torch.no_grad():
        save_file({k: v.contiguous() for k, v in main.items()}, path, metadata={"format": "pt"})


def hf_mtp(directory: Path):
    """(main model, its `MtpModel`) loaded by transformers from `directory`. transformers recognises V3 MTP
    keys by the full-size layer number 61; the tiny model's MTP layer is `num_hidden_layers`."""
    from transformers import DeepseekV3ForCausalLM
    from transformers.modeling_layers import MtpModel

    main = DeepseekV3ForCausalLM.from_pretrained(directory).eval()
    L = main.config.num_hidden_layers
    main._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{L}\..*"]
    return main, MtpModel.from_pretrained(main).eval()


def quantize_fp8(weight: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Block-scaled e4m3 quantisation: (fp8 [out, in], float32 scale_inv [ceil(out/bo), ceil(in/bi)])."""
    out, inp = weight.shape
    grid = (-(-out // block[0]), -(-inp // block[1]))
    scale = np.zeros(grid, np.float32)
    q = np.zeros(weight.shape, ml_dtypes.float8_e4m3fn)
    for i in range(grid[0]):
        for j in range(grid[1]):
            blk = weight[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            s = np.float32(np.abs(blk).max() / 448.0) or np.float32(1.0)
            scale[i, j] = s
            q[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] = (blk / s).astype(ml_dtypes.float8_e4m3fn)
    return q, scale


def reference_dequant(q: np.ndarray, scale: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """Element by element: `w[i, j] = float(q[i, j]) * scale[i // bo, j // bi]`."""
    out = np.zeros(q.shape, np.float32)
    for i in range(q.shape[0]):
        for j in range(q.shape[1]):
            out[i, j] = np.float32(q[i, j]) * scale[i // block[0], j // block[1]]
    return out


def fp8_copy(src: Path, dst: Path, block: tuple[int, int]) -> dict[str, np.ndarray]:
    """Copy a float32 checkpoint with every Linear weight of the decoder layers (router excluded) stored as
    block-scaled FP8 (torch `float8_e4m3fn`, written by safetensors), as DeepSeek-V3's hub checkpoint does,
    and next to it (`<dst>_dequantised`) the float32 checkpoint of the element-by-element dequantised weights.
    -> {weight key: its dequantised float32 value}."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    out, reference = {}, {}
    for key, value in tensors.items():
        quantised = key.startswith("model.layers.") and key.endswith("proj.weight") or key.endswith("proj_with_mqa.weight")
        if quantised and value.ndim == 2:
            q, s = quantize_fp8(value.numpy(), block)
            out[key] = torch.from_numpy(q.view(np.uint8)).view(torch.float8_e4m3fn)
            out[key + "_scale_inv"] = torch.from_numpy(s)
            reference[key] = reference_dequant(q, s, block)
        else:
            out[key] = value
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    dequantised = dst.parent / (dst.name + "_dequantised")  # the float32 checkpoint of the reference weights
    shutil.copytree(src, dequantised)
    save_file({k: torch.from_numpy(reference[k]) if k in reference else v for k, v in tensors.items()},
              str(dequantised / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return reference
