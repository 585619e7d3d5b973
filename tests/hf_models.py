"""Tiny random Hugging Face models, built and saved by the tests themselves (independent references)."""

from __future__ import annotations

from pathlib import Path


def perturb(model, seed: int = 0) -> None:
    """Randomise every persistent tensor so identity-like inits cannot hide bugs (norm weights 1 +- 0.1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def qwen3(directory: Path, *, moe: bool = False, tied: bool = False, seed: int = 0, **overrides):
    """Build, randomise and save a tiny Qwen3 (or Qwen3-MoE) causal LM; returns the torch model."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=20,  # != hidden / heads, like Qwen3-4B
        tie_word_embeddings=tied,
        max_position_embeddings=256,
        rope_theta=10000.0,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    common.update(overrides)
    if moe:
        common.setdefault("num_experts", 6)
        common.setdefault("num_experts_per_tok", 2)
        common.setdefault("moe_intermediate_size", 24)
        common.setdefault("norm_topk_prob", True)
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    model.eval()
    perturb(model, seed)
    model.save_pretrained(directory)
    return model
