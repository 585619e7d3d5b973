"""`dspark-jax generate` end to end on a tiny pair with a real tokenizer and chat template."""

from __future__ import annotations

from tiny_checkpoint import session_pair

import dspark_jax as dj
from dspark_jax.tools.cli import main


def test_generate_prints_text_and_stats(tmp_path_factory, capsys):
    target_dir, draft_dir = session_pair(tmp_path_factory)
    args = ["generate", "--target", str(target_dir), "--dtype", "float32", "--max-new-tokens", "12", "--prompt", "def f(x):"]
    assert main(args + ["--draft", str(draft_dir)]) == 0
    spec_out = capsys.readouterr().out
    assert "mean acceptance length (tau)" in spec_out and "prefix survival" in spec_out
    assert main(args + ["--draft", "none"]) == 0
    ar_out = capsys.readouterr().out
    assert "mode: AR" in ar_out
    assert main(args) == 0  # --target without --draft: plain AR, never the built-in draft of another target
    assert "mode: AR" in capsys.readouterr().out
    assert main(args + ["--draft", "prompt-lookup"]) == 0
    lookup_out = capsys.readouterr().out
    assert "mean acceptance length (tau)" in lookup_out
    assert lookup_out.split("\n---\n")[0] == ar_out.split("\n---\n")[0]
    # greedy speculative text equals greedy AR text
    assert spec_out.split("\n---\n")[0] == ar_out.split("\n---\n")[0]
    target = dj.load_target(target_dir, dtype="float32")
    ids = target.tokenizer.encode("def f(x):")
    tokens = dj.generate(target, None, [ids], max_new_tokens=12).tokens[0]
    assert ar_out.split("\n---\n")[0] == target.tokenizer.decode(tokens)


def test_generate_with_chat_template(tmp_path_factory, capsys):
    target_dir, draft_dir = session_pair(tmp_path_factory)
    args = ["generate", "--target", str(target_dir), "--draft", str(draft_dir), "--dtype", "float32",
            "--max-new-tokens", "8", "--prompt", "Say hi", "--chat", "--temperature", "0.7", "--top-p", "0.9"]
    assert main(args) == 0
    assert "tokens:" in capsys.readouterr().out
    target = dj.load_target(target_dir, dtype="float32")
    text = target.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi"}], add_generation_prompt=True)
    assert text.startswith("<|im_start|>user\nSay hi<|im_end|>\n") and text.endswith("<|im_start|>assistant\n")


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["generate", "--target", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
