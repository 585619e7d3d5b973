"""STS calibration (`dspark-jax calibrate`, tools/calibrate.py; docs/algorithm.md §4.3): the metric formulas,
the temperature fit recovering a known miscalibration, the collection on a small pair, and the shipped
calibrations of the built-in drafts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dspark_jax.engine import schedule as sched
from dspark_jax.tools import calibrate as cal


def test_metrics_follow_the_reference_formulas():
    pred = np.array([0.05, 0.12, 0.55, 0.58, 0.91])
    label = np.array([0, 1, 1, 0, 1])
    # bins of width 0.05: {0.05}, {0.12}, {0.55, 0.58}, {0.91}
    expected = (abs(0.05 - 0) + abs(0.12 - 1) + abs(0.55 + 0.58 - 1) + abs(0.91 - 1)) / 5
    assert cal.ece(pred, label) == pytest.approx(expected)
    assert cal.ece_grid(np.stack([pred, pred]), label) == pytest.approx([expected, expected])
    assert cal.brier(pred, label) == pytest.approx(np.mean((pred - label) ** 2))
    assert cal.auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == pytest.approx(1.0)
    assert cal.auroc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == pytest.approx(0.0)
    assert cal.auroc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)  # a tie within a fine bin counts one half
    assert np.isnan(cal.auroc([0.3, 0.4], [1, 1]))


def test_labels_leave_out_positions_after_a_stop():
    y, mask = cal.labels(np.array([0, 3, 2]), np.array([False, False, True]), 4)
    assert y.tolist() == [[0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]]
    assert mask.tolist() == [[True] * 4, [True] * 4, [True, True, False, False]]


def test_sts_recovers_a_known_temperature_and_cuts_ece():
    rng = np.random.default_rng(0)
    N, K, true_t = 20000, 3, np.array([2.5, 0.6, 1.5])
    logits = rng.normal(0.5, 2.0, (N, K))
    cond = 1.0 / (1.0 + np.exp(-logits / true_t))  # the real conditional acceptance
    accept = rng.uniform(size=(N, K)) < cond
    accepted = np.sum(np.cumprod(accept, axis=1), axis=1)
    y, mask = cal.labels(accepted, np.zeros(N, bool), K)
    temps = cal.fit_temperatures(logits[: N // 2], y[: N // 2], mask[: N // 2])
    assert np.allclose(temps, true_t, rtol=0.3), temps  # ECE minimisation is a coarse estimator
    held = slice(N // 2, None)
    before = cal.per_position(cal.survival(logits[held], [1.0] * K), y[held], mask[held])
    after = cal.per_position(cal.survival(logits[held], temps), y[held], mask[held])
    for k in range(K):
        assert after["ece"][k] < 0.025 and after["ece"][k] < before["ece"][k], (k, before["ece"], after["ece"])
    assert after["ece"][0] < 0.25 * before["ece"][0]
    # one temperature is monotone: the first position's ranking (hence AUROC) is kept
    assert after["auroc"][0] == pytest.approx(before["auroc"][0], abs=0.005)
    rates = cal.acceptance_rates(accepted, mask, K)
    assert rates[0] == pytest.approx(np.mean(cond[:, 0]), abs=0.02)


def test_collect_and_write_on_a_small_pair(tmp_path):
    from dspark_jax.config import RopeConfig
    from dspark_jax.models.qwen3 import Qwen3Config
    from dspark_jax.testing import synthetic

    cfg = Qwen3Config(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=16, rope=RopeConfig(theta=1e4), max_position_embeddings=256)
    successor = synthetic.random_permutation_successor(64, seed=1)
    target = synthetic.bigram_target(cfg, successor=successor, seed=0)
    draft = synthetic.oracle_draft(target, synthetic.draft_config_for(cfg, num_layers=1, markov_rank=8), successor,
                                   accuracy=0.7, seed=2)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    calib, report = cal.calibrate(target, draft, prompts, max_new_tokens=24, batch_size=4, log=lambda m: None)
    K = draft.module.max_draft_length
    assert report["rounds_fit"] > 0 and report["rounds_heldout"] > 0
    assert len(calib.temperatures) == K and all(t > 0 for t in calib.temperatures)
    assert all(0 <= a <= 1 for a in calib.acceptance) and 0 < calib.acceptance[0] < 1
    path = cal.write(tmp_path, calib, report)
    loaded = sched.load_calibration(tmp_path)
    assert loaded.temperatures == pytest.approx(calib.temperatures, rel=1e-5)
    assert json.loads(path.read_text())["report"]["rounds_heldout"] == report["rounds_heldout"]
    assert "| position |" in cal.markdown(report)


def test_bad_calibration_file_is_refused(tmp_path):
    (tmp_path / sched.CALIBRATION_FILE).write_text(json.dumps({"temperatures": [1.0, -2.0], "acceptance": [0.5, 0.5]}))
    with pytest.raises(Exception, match="positive"):
        sched.load_calibration(tmp_path)
    (tmp_path / sched.CALIBRATION_FILE).write_text(json.dumps({"acceptance": [1.5]}))
    with pytest.raises(Exception, match=r"\[0, 1\]"):
        sched.load_calibration(tmp_path)


def test_shipped_calibrations():
    from dspark_jax import assets

    dspark = sched.load_calibration(assets.DSPARK_DRAFT)
    dflash = sched.load_calibration(assets.DFLASH_DRAFT)
    assert dspark is not None and len(dspark.temperatures) == 7
    assert dflash is not None and dflash.temperatures is None and len(dflash.acceptance) == 7
    report = json.loads((assets.DSPARK_DRAFT / sched.CALIBRATION_FILE).read_text())["report"]
    # on the held-out prompts STS lowers the mean ECE over positions
    assert np.mean(report["after"]["ece"]) < np.mean(report["before"]["ece"])
