"""`dspark-jax bench` on a tiny pair: the report's PNGs are real PNGs and its markdown shows exactly the JSON's numbers.

The pair is built independently of dspark_jax where it can be (`tiny_checkpoint`: a transformers Qwen3 target
with a `tokenizers` BPE and our chat template, a numpy DSpark draft in the DeepSpec layout); the DFlash draft
is a random `synthetic` draft written with our DeepSpec exporter.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from tiny_checkpoint import build_pair

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Short prompts: with the chat template all fit one prompt-length bucket, so the run compiles few programs.
SETS = {
    "math": ["Janet has 16 eggs and sells the rest at the market for $2 each.",
             "Please reason step by step, and put your final answer within \\boxed{}."],
    "code": ["Write a python function to find the volume of a triangular prism.", "def fibonacci(n):"],
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return root, *build_pair(root)


@pytest.fixture(scope="module")
def report(pair):
    import dspark_jax as dj
    from dspark_jax.proposers.dspark_checkpoint import export_draft
    from dspark_jax.testing import synthetic
    from dspark_jax.tools import cli

    root, target_dir, draft_dir = pair
    target = dj.load_target(target_dir, dtype="float32")
    dflash_cfg = synthetic.draft_config_for(target.config, block_size=4, markov_rank=0, confidence=False)
    dflash_dir = export_draft(synthetic.random_draft(target, dflash_cfg, seed=3), root / "dflash", dtype="float32",
                              base_config=json.loads((target_dir / "config.json").read_text()))
    files = []
    for name, turns in SETS.items():
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"turns": [t]}) + "\n" for t in turns))
        files.append(str(path))
    out = root / "report"
    rc = cli.main([
        "bench", "--target", str(target_dir), "--draft", str(draft_dir), "--dflash", str(dflash_dir),
        "--prompts", *files, "--num-prompts", "2", "--max-new-tokens", "6", "--batch-sizes", "1,2",
        "--temperatures", "0,1", "--repetitions", "1", "--acceptance-batch", "2", "--dtype", "float32",
        "--out", str(out),
    ])
    assert rc == 0
    return out


def test_pngs_exist_and_are_png(report):
    names = ["acceptance_by_position.png", "tau_per_set.png", "speed_vs_batch.png"]
    for name in names:
        data = (report / name).read_bytes()
        assert len(data) > 1000, name
        assert data.startswith(PNG_SIGNATURE), name
    md = (report / "report.md").read_text()
    for name in names:
        assert f"({name})" in md


def test_markdown_shows_the_json_numbers(report):
    from dspark_jax.tools.bench import parse_markdown_tables

    data = json.loads((report / "report.json").read_text())
    shown = parse_markdown_tables((report / "report.md").read_text())
    assert [t["title"] for t in data["tables"]] == list(shown)
    for table in data["tables"]:
        header, *rows = shown[table["title"]]
        assert header == table["columns"]
        assert len(rows) == len(table["rows"]) > 0
        for md_row, json_row in zip(rows, table["rows"], strict=True):
            assert len(md_row) == len(json_row)
            for text, value in zip(md_row, json_row, strict=True):
                if value is None:
                    assert text == "-"
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    assert float(text) == value, (table["title"], text, value)
                else:
                    assert text == str(value)


def test_report_numbers_are_consistent(report):
    data = json.loads((report / "report.json").read_text())
    K = data["meta"]["K"]
    assert data["meta"]["drafts"].keys() == {"DSpark", "DFlash"}
    # Acceptance: tau between 1 and K + 1, survival probabilities non-increasing in [0, 1].
    assert len(data["data"]["acceptance"]) == len(SETS) * 2 * 2
    for entry in data["data"]["acceptance"]:
        assert 1.0 <= entry["tau"] <= K + 1
        survival = [s for s in entry["prefix_survival"] if s is not None]
        assert all(0.0 <= s <= 1.0 for s in survival)
        assert all(a >= b for a, b in zip(survival, survival[1:], strict=False))
    # The JSON's table agrees with the raw data it was built from.
    tau_table = next(t for t in data["tables"] if t["title"].startswith("Mean acceptance length"))
    assert len(tau_table["rows"]) == (len(SETS) + 1) * 2
    for row in tau_table["rows"]:
        entries = data["data"]["acceptance"] if row[0] != "all" else data["data"]["acceptance_all_sets"]
        raw = next(e for e in entries if e.get("set", "all") == row[0] and e["temperature"] == row[1] and e["draft"] == "DSpark")
        assert math.isclose(row[3], raw["tau"], rel_tol=1e-3)
    # The pooled tau is the round-weighted mean of the per-set taus.
    for pooled in data["data"]["acceptance_all_sets"]:
        parts = [e for e in data["data"]["acceptance"] if e["temperature"] == pooled["temperature"] and e["draft"] == pooled["draft"]]
        weighted = sum(e["tau"] * e["rounds"] for e in parts) / sum(e["rounds"] for e in parts)
        assert math.isclose(pooled["tau"], weighted, rel_tol=1e-9)
    # Speed: every arm timed at every batch size; greedy speculative output equals AR output (lossless).
    assert [r["batch"] for r in data["data"]["speed"]] == [1, 2]
    for r in data["data"]["speed"]:
        assert set(r["arms"]) == {"AR", "DSpark", "DFlash"}
        for name, arm in r["arms"].items():
            assert arm["tokens_per_s"] > 0 and arm["timing"]["repetitions"] == 1
            assert arm["identical_to_ar"] == r["batch"], name
        assert np.isclose(r["arms"]["DSpark"]["speedup"], r["arms"]["DSpark"]["tokens_per_s"] / r["arms"]["AR"]["tokens_per_s"])
    for key in ("cpu_model", "cpu_cores", "versions"):
        assert key in data["meta"]["machine"]


def test_inflated_target_keeps_outputs_and_adds_cost(pair):
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    import dspark_jax as dj
    from dspark_jax.tools import bench

    target = dj.load_target(pair[1], dtype="float32")
    big = bench.inflate_target(target, 0.2)
    assert big.config.num_layers > target.config.num_layers and big.param_bytes - target.param_bytes >= 0.2e6

    @functools.partial(jax.jit, static_argnums=0)
    def forward(graphdef, params, tokens):
        m = nnx.merge(graphdef, params)
        hidden, _, feats = m(tokens, jnp.zeros(1, jnp.int32), m.init_cache(1, 8), capture=(0, 1, 2))
        return m.logits(hidden), feats

    tokens = jnp.array([[3, 1, 4, 1, 5, 9]])
    (logits, feats), (big_logits, big_feats) = (forward(t.graphdef, t.params, tokens) for t in (target, big))
    assert bool(jnp.all(logits == big_logits)) and bool(jnp.all(feats == big_feats))
