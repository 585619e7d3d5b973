"""Prompts are tokenized as transformers tokenizes them, on a Qwen3-style and a Gemma-4-style tokenizer built
here (no network): raw text as `AutoTokenizer(...)(text)` (Gemma's post-processor adds `<bos>`, Qwen3's adds
nothing), chat-rendered text as `apply_chat_template(..., tokenize=True)` (exactly one `<bos>`), through the
tokenizer and through the surfaces that tokenize prompts (`generate`'s text prompts, batch-job lines, CLI)."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE
from transformers import AutoTokenizer

import dspark_jax as dj
from dspark_jax.engine import generation
from dspark_jax.tokenizer import Tokenizer as OurTokenizer
from dspark_jax.tools import batch

CORPUS = [
    "Hello there, how are you? Be brief. The answer is 42.",
    "def add(a, b):\n    return a + b\n",
    "Write a python function to reverse a string.",
    "Ünïcödé text: naïve café, 日本語, emoji 🙂 and tabs\tand  double  spaces.",
] * 8
TEXTS = [
    "Hello there",
    " leading space and trailing space ",
    "def add(a, b):\n    return a + b\n",
    "Ünïcödé: naïve café 日本語 🙂",
    "tabs\tand  double  spaces",
    "<|im_start|> in raw text",
    "<bos>already a bos",
]
MESSAGES = [
    [{"role": "user", "content": "Write a python function to reverse a string."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there, how are you?"}],
]

QWEN_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' + message['content'] + '<turn|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|turn>model\\n' }}{% endif %}"
)
QWEN_PRETOKENIZE = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def qwen3_tokenizer(directory):
    """The pipeline of transformers' Qwen2Tokenizer (Qwen3 uses it): NFC, regex split + byte level, byte-level BPE,
    a ByteLevel post-processor (adds no tokens); config as Qwen3's (no BOS, `add_bos_token: false`)."""
    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False, "add_prefix_space": False, "bos_token": None,
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace",
              "split_special_tokens": False, "chat_template": QWEN_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def gemma4_tokenizer(directory, post_processor: bool = True):
    """The pipeline of transformers' GemmaTokenizer: spaces to "▁", BPE with byte fallback, a post-processor that
    prepends `<bos>`; config as Gemma's (`add_bos_token: true`), a chat template that writes `<bos>` itself.
    Without `post_processor` only the config asks for `<bos>`: transformers ignores `add_bos_token` when a
    tokenizer.json exists, so neither side adds one."""
    tok = Tokenizer(BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, initial_alphabet=list("▁"))
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in byte_tokens if tok.token_to_id(t) is None])
    bos = tok.token_to_id("<bos>")
    if post_processor:
        tok.post_processor = processors.TemplateProcessing(single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1",
                                                           special_tokens=[("<bos>", bos)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>",
              "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>",
              "chat_template": GEMMA_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


BUILDERS = {"qwen3": qwen3_tokenizer, "gemma4": gemma4_tokenizer,
            "gemma4 bos from config": lambda d: gemma4_tokenizer(d, post_processor=False)}


@pytest.fixture(scope="module", params=list(BUILDERS))
def tokenizers_pair(request, tmp_path_factory):
    directory = BUILDERS[request.param](tmp_path_factory.mktemp(request.param.replace(" ", "_")))
    return request.param, directory, OurTokenizer.from_directory(directory), AutoTokenizer.from_pretrained(directory)


def test_raw_text_is_tokenized_as_transformers_tokenizer_call(tokenizers_pair):
    family, _, ours, theirs = tokenizers_pair
    bos = theirs.bos_token_id
    for text in TEXTS:
        expected = theirs(text)["input_ids"]
        assert ours.encode(text, add_special_tokens=True) == expected, text
        if family == "gemma4":
            assert expected[0] == bos and expected.count(bos) == 1 + ("<bos>" in text)
        else:  # Qwen3 (and a config-only add_bos_token) add nothing
            assert expected == theirs(text, add_special_tokens=False)["input_ids"]


def test_chat_rendered_text_gets_no_second_bos(tokenizers_pair):
    family, _, ours, theirs = tokenizers_pair
    for messages in MESSAGES:
        rendered = ours.apply_chat_template(messages, add_generation_prompt=True)
        assert rendered == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        expected = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        expected = list(expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected)
        assert ours.encode(rendered) == expected
        if family.startswith("gemma4"):
            assert expected[0] == theirs.bos_token_id and expected.count(theirs.bos_token_id) == 1


def _target_with_tokenizer(directory, vocab: int):
    cfg = dj.Qwen3Config(model_type="qwen3", vocab_size=vocab, hidden_size=32, intermediate_size=48, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=16, rope=dj.RopeConfig(theta=1e4),
                         max_position_embeddings=256)
    return dataclasses.replace(dj.Target.random(cfg), directory=directory)


def test_prompt_surfaces_use_the_right_encoding(tokenizers_pair):
    """`generate` text prompts and raw batch lines: `tokenizer(text)`; chat batch lines: the rendered template."""
    _, directory, ours, theirs = tokenizers_pair
    target = _target_with_tokenizer(directory, ours.vocab_size)
    _, token_lists, _ = generation.build_requests(
        target, [TEXTS[0], TEXTS[3]], max_new_tokens=4, temperature=0.0, top_k=0, top_p=1.0, seed=0, stop_token_ids=[],
        confidence_threshold=0.0,
    )
    assert token_lists == [theirs(TEXTS[0])["input_ids"], theirs(TEXTS[3])["input_ids"]]
    prompts = [batch.parse_line(json.dumps({"prompt": TEXTS[0]}), 0), batch.parse_line(json.dumps({"messages": MESSAGES[1]}), 1)]
    fake = types.SimpleNamespace(tokenizer=target.tokenizer, config=target.config)
    raw, bad = batch._rows(prompts[:1], fake, batch.Settings(chat=False))
    assert not bad and raw[0].ids == theirs(TEXTS[0])["input_ids"]
    chat, bad = batch._rows(prompts, fake, batch.Settings(chat=True))
    assert not bad
    for row, messages in zip(chat, [[{"role": "user", "content": TEXTS[0]}], MESSAGES[1]], strict=True):
        expected = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, enable_thinking=False)
        assert row.ids == list(expected["input_ids"] if hasattr(expected, "keys") else expected)
