"""Checkpoint reading: strict coverage, corrupt files, unsafe pickles, dialects, dtypes, shards, orbax."""

from __future__ import annotations

import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from hf_models import qwen3

import dspark_jax as dj
from converters.safetensors_io import SafetensorsFile, save_file
from dspark_jax.errors import CheckpointError, ConfigError
from dspark_jax.models.loading import convert_to_orbax, parse_target_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen3")
    model = qwen3(directory, seed=7)
    return directory, model


def _tensors(directory):
    st = SafetensorsFile(directory / "model.safetensors")
    return {k: np.array(st.get(k)) for k in st.keys()}


def _variant(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = _tensors(src)
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def _params_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))


def test_missing_extra_and_misshaped_tensors_are_named(checkpoint, tmp_path):
    src, _ = checkpoint
    key = "model.layers.1.self_attn.k_proj.weight"
    missing = _variant(src, tmp_path / "missing", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        dj.load_target(missing, dtype="float32")

    extra = _variant(src, tmp_path / "extra", lambda t: t.update({"model.layers.0.mlp.surprise.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.surprise\.weight"):
        dj.load_target(extra, dtype="float32")

    def misshape(t):
        t[key] = t[key][:-1]

    bad = _variant(src, tmp_path / "bad", misshape)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*shape"):
        dj.load_target(bad, dtype="float32")


def test_truncated_file_fails_cleanly(checkpoint, tmp_path):
    src, _ = checkpoint
    dst = tmp_path / "truncated"
    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        dj.load_target(dst, dtype="float32")
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        dj.load_target(dst, dtype="float32")


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch EXPLOITED_BY_PICKLE",))


def test_bin_with_code_executing_pickle_is_refused(checkpoint, tmp_path, monkeypatch):
    src, model = checkpoint
    dst = tmp_path / "bin"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = dict(model.state_dict())
    state["evil"] = _Exploit()
    torch.save(state, dst / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        dj.load_target(dst, dtype="float32")
    assert not (tmp_path / "EXPLOITED_BY_PICKLE").exists()


def test_plain_bin_state_dict_loads(checkpoint, tmp_path):
    src, model = checkpoint
    dst = tmp_path / "bin_ok"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    torch.save(model.state_dict(), dst / "pytorch_model.bin")
    assert _params_equal(dj.load_target(dst, dtype="float32"), dj.load_target(src, dtype="float32"))


def test_unsupported_model_type_lists_supported(checkpoint, tmp_path):
    src, _ = checkpoint
    dst = tmp_path / "llama"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = "llama"
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="qwen3.*qwen3_moe"):
        dj.load_target(dst)


def test_sharded_index_and_half_precision(checkpoint, tmp_path):
    src, model = checkpoint
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="60KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert _params_equal(dj.load_target(sharded, dtype="float32"), dj.load_target(src, dtype="float32"))

    for torch_dtype, np_dtype in ((torch.bfloat16, ml_dtypes.bfloat16), (torch.float16, np.float16)):
        half = tmp_path / str(torch_dtype)
        model.to(torch_dtype).save_pretrained(half)
        model.to(torch.float32)
        loaded = dj.load_target(half, dtype="float32")
        emb = np.asarray(loaded.params["embed_tokens"].get_value())
        expected = model.model.embed_tokens.weight.detach().numpy().astype(np_dtype).astype(np.float32)
        assert np.array_equal(emb, expected)
        assert dj.load_target(half, dtype="bfloat16").params["embed_tokens"].get_value().dtype == jax.numpy.bfloat16


def test_duplicate_key_across_shards(checkpoint, tmp_path):
    src, _ = checkpoint
    dst = tmp_path / "dup"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = _tensors(src)
    save_file(tensors, dst / "a.safetensors")
    save_file({"model.norm.weight": tensors["model.norm.weight"]}, dst / "b.safetensors")
    weight_map = {k: "a.safetensors" for k in tensors} | {"model.norm.weight": "b.safetensors"}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*twice"):
        dj.load_target(dst, dtype="float32")


def test_hub_dialect_config_equals_transformers5_dialect(checkpoint, tmp_path):
    """Hub configs carry rope_theta / rope_scaling at the top level and num_experts; both must parse alike."""
    src, _ = checkpoint
    dst = tmp_path / "hub"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope["rope_theta"]
    cfg["rope_scaling"] = None
    (dst / "config.json").write_text(json.dumps(cfg))
    assert parse_target_config(dst / "config.json") == parse_target_config(src / "config.json")

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    cfg["rope_scaling"] = dict(yarn, type="yarn")
    del cfg["rope_scaling"]["rope_type"]
    (dst / "config.json").write_text(json.dumps(cfg))
    legacy = parse_target_config(dst / "config.json")
    assert legacy.rope.rope_type == "yarn" and legacy.rope.factor == 4.0
    assert legacy.rope.original_max_position_embeddings == 64


def test_orbax_conversion_round_trip_and_cli(checkpoint, tmp_path):
    src, _ = checkpoint
    from dspark_jax.tools.cli import main

    assert main(["convert", str(src), str(tmp_path / "orbax"), "--dtype", "float32"]) == 0
    restored = dj.load_target(tmp_path / "orbax", dtype="float32")
    original = dj.load_target(src, dtype="float32")
    assert _params_equal(restored, original)
    prompts = [[1, 2, 3]]
    assert dj.generate(restored, None, prompts, max_new_tokens=5).tokens == dj.generate(original, None, prompts, max_new_tokens=5).tokens
    with pytest.raises(CheckpointError, match="not empty"):
        convert_to_orbax(src, tmp_path / "orbax")
