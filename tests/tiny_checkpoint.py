"""A tiny target + draft pair on disk, built independently of dspark_jax, for tests of the user surfaces.

* target: a Qwen3 causal LM created and saved by `transformers` (random weights), with a byte-level BPE
  tokenizer trained by the `tokenizers` library and a chat template written here (Qwen-style markers).
* draft: a DSpark draft in the DeepSpec checkpoint layout (keys without prefix, PyTorch `[out, in]` Linear
  weights), random weights drawn with numpy, embedding and output head copied from the target as DeepSpec
  does. Untrained, so its acceptance length is close to 1; it exercises the whole speculative path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)

CORPUS = [
    "Janet has 16 eggs and sells the rest at the market for $2 each.",
    "Write a python function to find the volume of a triangular prism.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Compose an engaging travel blog post about a recent trip to Hawaii.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > # : ; , . ! ?",
]


def build_tokenizer(directory: Path, vocab_size: int = 384) -> int:
    """Train a byte-level BPE on a few sentences; write tokenizer.json + tokenizer_config.json. -> vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "chat_template": CHAT_TEMPLATE,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok.get_vocab_size(with_added_tokens=True), tok.token_to_id("<|im_end|>")


def build_target(directory: Path, *, seed: int = 0, max_position_embeddings: int = 1024) -> dict:
    """Save a random tiny Qwen3 with transformers, plus the tokenizer. -> its config dict."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    vocab, eos = build_tokenizer(directory)
    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=eos,
        bos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos], "do_sample": False}))
    return json.loads((directory / "config.json").read_text())


def build_draft(directory: Path, target_dir: Path, *, seed: int = 1, block_size: int = 4, markov_rank: int = 8) -> None:
    """Write a random DSpark draft for the target in `target_dir` (DeepSpec layout)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tcfg = json.loads((target_dir / "config.json").read_text())
    V, D, F = tcfg["vocab_size"], tcfg["hidden_size"], tcfg["intermediate_size"]
    N, G, H = tcfg["num_attention_heads"], tcfg["num_key_value_heads"], tcfg["head_dim"]
    layer_ids = [0, 1]
    num_layers = 1
    cfg = dict(tcfg)
    cfg.update(
        architectures=["Qwen3DSparkModel"],
        num_hidden_layers=num_layers,
        num_target_layers=tcfg["num_hidden_layers"],
        block_size=block_size,
        target_layer_ids=layer_ids,
        mask_token_id=V - 1,
        num_anchors=64,
        enable_confidence_head=True,
        confidence_head_with_markov=True,
        markov_rank=markov_rank,
        markov_head_type="vanilla",
        tie_word_embeddings=False,
        layer_types=["full_attention"] * num_layers,
    )
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    with safe_open(str(target_dir / "model.safetensors"), "np") as f:
        embed = f.get_tensor("model.embed_tokens.weight").astype(np.float32)
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.05):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def ones(n):
        return (1.0 + rng.standard_normal(n) * 0.05).astype(np.float32)

    tensors = {
        "embed_tokens.weight": embed.copy(),
        "lm_head.weight": embed.copy(),
        "fc.weight": w(D, len(layer_ids) * D),
        "hidden_norm.weight": ones(D),
        "norm.weight": ones(D),
        "markov_head.markov_w1.weight": w(V, markov_rank),
        "markov_head.markov_w2.weight": w(V, markov_rank),
        "confidence_head.proj.weight": w(1, D + markov_rank),
        "confidence_head.proj.bias": w(1),
    }
    for i in range(num_layers):
        p = f"layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": ones(D),
            p + "post_attention_layernorm.weight": ones(D),
            p + "mlp.gate_proj.weight": w(F, D),
            p + "mlp.up_proj.weight": w(F, D),
            p + "mlp.down_proj.weight": w(D, F),
            p + "self_attn.q_proj.weight": w(N * H, D),
            p + "self_attn.k_proj.weight": w(G * H, D),
            p + "self_attn.v_proj.weight": w(G * H, D),
            p + "self_attn.o_proj.weight": w(D, N * H),
            p + "self_attn.q_norm.weight": ones(H),
            p + "self_attn.k_norm.weight": ones(H),
        })
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def build_pair(root: Path) -> tuple[Path, Path]:
    """-> (target directory, draft directory) under `root`; reused when a complete pair is already there."""
    root = Path(root)
    target, draft = root / "target", root / "draft"
    done = root / "complete"
    if not done.exists():
        build_target(target)
        build_draft(draft, target)
        done.touch()
    return target, draft


def session_pair(tmp_path_factory) -> tuple[Path, Path]:
    """One pair per pytest session, shared by the test modules that need one."""
    return build_pair(tmp_path_factory.getbasetemp() / "tiny_pair")


if __name__ == "__main__":
    import sys

    print(*build_pair(Path(sys.argv[1])))
