"""Hugging Face repo ids as checkpoints (`models.loading.resolve_checkpoint`), against a hub cache populated here.

No network: every test runs with `HF_HUB_OFFLINE=1` and `HF_HUB_CACHE` pointing at a directory laid out as
huggingface_hub lays out its cache (`models--owner--name/refs/<ref>` holding a commit, `snapshots/<commit>/`
holding the files), filled with copies of the built-in checkpoints.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from dspark_jax import assets
from dspark_jax.errors import CheckpointError, DSparkError, HubError
from dspark_jax.models.loading import HUB_PATTERNS, is_hub_id, resolve_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def cache_repo(cache: Path, repo_id: str, source: Path, commit: str, refs=("main",), extra: dict | None = None) -> Path:
    """Put `source`'s files into the hub cache as `repo_id` at `commit`; `extra` adds files (name -> bytes)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file():
            shutil.copy2(f, snapshot / f.name)
    for name, data in (extra or {}).items():
        (snapshot / name).write_bytes(data)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return cache


def test_hub_id_form():
    assert is_hub_id("Qwen/Qwen3-8B") and is_hub_id("Qwen/Qwen3-8B@main") and is_hub_id("a-b/c.d@" + COMMIT)
    assert not is_hub_id("Qwen3-8B") and not is_hub_id("/abs/path") and not is_hub_id("a/b/c") and not is_hub_id("../x")


def test_target_and_draft_load_from_the_offline_cache(hub):
    import dspark_jax as dj

    snapshot = cache_repo(hub, "acme/tiny-target", assets.TARGET, COMMIT, refs=("main", "v1"))
    cache_repo(hub, "acme/tiny-draft", assets.DSPARK_DRAFT, OTHER_COMMIT)
    assert resolve_checkpoint("acme/tiny-target") == snapshot
    assert resolve_checkpoint("acme/tiny-target@v1") == snapshot
    assert resolve_checkpoint(f"acme/tiny-target@{COMMIT}") == snapshot
    target = dj.load_target("acme/tiny-target", dtype="float32")
    assert target.directory == snapshot
    local = dj.load_target(assets.TARGET, dtype="float32")
    for (path, a), (_, b) in zip(nnx.to_flat_state(target.params), nnx.to_flat_state(local.params), strict=True):
        assert np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value())), path
    draft = dj.load_draft("acme/tiny-draft@main", dtype="float32")
    assert draft.directory.name == OTHER_COMMIT
    assert target.tokenizer.encode("hello") == local.tokenizer.encode("hello")


def test_a_local_directory_wins_and_nothing_is_fetched(hub, tmp_path, monkeypatch):
    """A directory at the given path is used as is, even when the same id is cached and even online (an
    unreachable endpoint would fail any fetch)."""
    cache_repo(hub, "acme/tiny-target", assets.TARGET, COMMIT)
    local = tmp_path / "acme" / "tiny-target"
    shutil.copytree(assets.TARGET, local)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert resolve_checkpoint("acme/tiny-target") == Path("acme/tiny-target")
    assert resolve_checkpoint(local) == local


def test_missing_ids_and_revisions_are_clear_errors(hub):
    cache_repo(hub, "acme/tiny-target", assets.TARGET, COMMIT)
    with pytest.raises(HubError, match=r"--target 'acme/nope' is not a local directory and not in the hub cache .*"
                                       r"HF_HUB_OFFLINE is set: download it once online \(huggingface-cli download acme/nope\)"):
        resolve_checkpoint("acme/nope", "--target")
    with pytest.raises(HubError, match="acme/tiny-target@v9.*--revision v9"):
        resolve_checkpoint("acme/tiny-target@v9", "--target")
    assert issubclass(HubError, CheckpointError) and issubclass(HubError, DSparkError)
    # through the CLI: the flag is named, exit code 2, before anything loads
    from dspark_jax.tools import cli

    inp = hub / "prompts.jsonl"
    inp.write_text(json.dumps({"prompt": "hi"}) + "\n")
    assert cli.main(["batch", "--input", str(inp), "--output", str(hub / "out.jsonl"), "--target", "acme/nope"]) == 2


def test_allow_patterns_skip_code_and_pickles(hub):
    """The cached listing of the repo (huggingface_hub's tree cache) names a `.bin`, a `.py` and a README that the
    snapshot lacks: with the loader's allow-patterns the snapshot is complete; a snapshot without a needed file is
    refused as incomplete."""
    tree = pytest.importorskip("huggingface_hub._tree_cache")
    snapshot = cache_repo(hub, "acme/tiny-target", assets.TARGET, COMMIT)
    repo_folder = snapshot.parent.parent
    listed = [f.name for f in snapshot.iterdir()] + ["pytorch_model.bin", "modeling_acme.py", "README.md"]
    entries = {name: tree.TreeCacheEntry(size=1, blob_id="0" * 40, lfs_sha256=None, lfs_size=None, xet_hash=None)
               for name in listed}
    tree.write_tree_cache(str(repo_folder), COMMIT, entries)
    assert tree.read_tree_cache(str(repo_folder), COMMIT) is not None
    assert resolve_checkpoint("acme/tiny-target") == snapshot
    assert not any(Path(name).match(p) for name in ("pytorch_model.bin", "modeling_acme.py", "README.md") for p in HUB_PATTERNS)
    # the same listing without the patterns would need the three extra files: the library itself says so
    from huggingface_hub import snapshot_download

    with pytest.raises(Exception, match="incomplete"):
        snapshot_download("acme/tiny-target", local_files_only=True, cache_dir=str(hub))
    (snapshot / "tokenizer.json").unlink()  # a file the loader needs
    with pytest.raises(HubError, match="cached copy is incomplete.*tokenizer.json"):
        resolve_checkpoint("acme/tiny-target", "--target")
