"""The fixture pair's offline corpus: this interpreter's standard-library sources and the public prompt sets.

* Source files are split into train / held-out by a hash of their relative path (stable across machines).
* Functions with a docstring become chat conversations: the user asks for the function (in the style of
  the MBPP or HumanEval prompts), the assistant answers with its source in a ```python block.
* Every prompt set is split into `test` (its first prompts: acceptance is reported on these; never trained on, by
  the target or the draft), `dev` (the next ones: held-out evaluation during draft training) and `train` (the rest).
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
import textwrap
import zlib
from collections.abc import Iterator
from pathlib import Path

from dspark_jax.errors import InputError


def default_prompt_dir() -> Path:
    """`$DSPARK_JAX_PROMPTS`, else the project's shared prompt sets next to the repository checkout."""
    env = os.environ.get("DSPARK_JAX_PROMPTS")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data" / "prompts"

EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path | None = None) -> list[Path]:
    """Python files of the standard library (tests and third-party packages excluded), sorted."""
    root = Path(root or stdlib_root())
    files = [p for p in root.rglob("*.py") if not EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: str(p.relative_to(root)))


def is_heldout(relative_path: str, heldout_percent: int) -> bool:
    return zlib.crc32(relative_path.encode()) % 100 < heldout_percent


def split_files(root: Path | None, heldout_percent: int) -> tuple[list[Path], list[Path]]:
    """(train, held-out) source files, split by a hash of the path relative to the stdlib root."""
    root = Path(root or stdlib_root())
    train, heldout = [], []
    for p in source_files(root):
        (heldout if is_heldout(str(p.relative_to(root)), heldout_percent) else train).append(p)
    return train, heldout


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _first_sentence(doc: str) -> str:
    para = doc.strip().split("\n\n")[0]
    return " ".join(para.split())


def function_conversations(path: Path, *, min_lines: int = 3, max_lines: int = 40) -> Iterator[dict]:
    """Chat conversations asking for each documented function of one source file."""
    text = read_text(path)
    if text is None:
        return
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return
    lines = text.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc or node.end_lineno is None:
            continue
        start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
        if not min_lines <= node.end_lineno - start <= max_lines:
            continue
        source = textwrap.dedent("\n".join(lines[start : node.end_lineno]))
        sentence = _first_sentence(doc)
        if not 10 <= len(sentence) <= 300:
            continue
        if zlib.crc32(f"{path.name}:{node.name}:{node.lineno}".encode()) % 2:  # MBPP-style request
            request = f"Write a python function `{node.name}` that does the following: {sentence}"
        else:  # HumanEval-style request: signature and docstring, the model writes the body
            header = source.split(":\n", 1)[0] + ":" if ":\n" in source else f"def {node.name}(...):"
            request = (
                "Write a solution to the following problem and make sure that it passes the tests:\n```python\n"
                + header + '\n    """' + textwrap.indent(doc, "    ").strip() + '\n    """\n\n```'
            )
        yield {"conversations": [{"role": "user", "content": request},
                                 {"role": "assistant", "content": "```python\n" + source + "\n```"}]}


def read_prompt_set(path: Path) -> list[str]:
    """First user turn of every record of a `{"turns": [...]}` JSONL prompt file."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                turns = json.loads(line)["turns"]
                out.append(str(turns[0]))
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                raise InputError(f"{path}:{n}: expected a JSON object with a non-empty 'turns' list ({e})") from e
    return out


def split_prompts(prompts_dir: Path, test_per_set: dict[str, int], dev_per_set: dict[str, int]) -> dict[str, dict[str, list[str]]]:
    """`{set name: {"test": [...], "dev": [...], "train": [...]}}`: per file, the first `test_per_set[name]` prompts
    are `test`, the next `dev_per_set[name]` are `dev`, the rest `train`.

    Taking the test prompts from the head of each file keeps every "first N prompts of a set" evaluation (e.g.
    `dspark-jax bench --num-prompts N` with N <= the test count) on prompts that nothing was trained on.
    """
    prompts_dir = Path(prompts_dir)
    files = sorted(prompts_dir.glob("*.jsonl"))
    if not files:
        raise InputError(f"no *.jsonl prompt files in {prompts_dir}")
    out = {}
    for path in files:
        name = path.stem
        prompts = read_prompt_set(path)
        n_test, n_dev = test_per_set.get(name, 0), dev_per_set.get(name, 0)
        if n_test + n_dev > len(prompts):
            raise InputError(f"{path} has {len(prompts)} prompts, fewer than test {n_test} + dev {n_dev}")
        out[name] = {"test": prompts[:n_test], "dev": prompts[n_test : n_test + n_dev], "train": prompts[n_test + n_dev :]}
    return out
