"""The coupled sampler (`sampler="coupled"`, docs/algorithm.md §3.6): sampled speculative output equals sampled
plain decoding token for token for the same seed, whatever the draft, K, the schedule, the batch size, the
batching mode or a kill/resume point (float32), and it samples the target distribution exactly.

* equality: every row of a mixed job (prompts of 1 to 70 tokens, per-row temperatures including a greedy row,
  top-k / top-p rows) equals plain coupled decoding, for K = 1 and 7, one batch / continuous slots / static
  groups, fixed and scheduled rounds, with a DSpark draft right 60% of the time (partial acceptances, checked
  to happen), and DFlash, EAGLE-3, DeepSeek MTP and prompt-lookup drafts; more cells with `-m slow`;
* each proposer drafts with the noise of the position it drafts (the acceptance the coupling buys depends on
  it, the output does not);
* `dspark-jax batch --sampler coupled`, killed and resumed at another batch size, under the auto schedule,
  gives the answers of plain decoding;
* exactness: chi-square of coupled draws at V = 151,936 against the designed distribution of
  `test_sampler_exact.py`, and of whole coupled speculative generations at V = 8 against the exact processed
  target distribution computed by transformers (`test_spec_sampling.py`'s setup).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scistats

import dspark_jax as dj
from dspark_jax.config import SamplingParams
from dspark_jax.engine import generation, sampling, spec, verify
from dspark_jax.errors import InputError
from dspark_jax.testing import mtp as synthetic_mtp
from dspark_jax.testing import synthetic, synthetic_eagle3

LENGTHS = [5, 40, 70, 17, 1, 28, 9]
BUDGETS = [20, 7, 24, 12, 2, 30, 16]
ROWS = dict(temperature=[1.0, 0.7, 1.0, 0.0, 1.3, 1.0, 0.8], top_k=[0, 0, 20, 0, 0, 5, 0], top_p=[1.0, 0.9, 1.0, 1.0, 1.0, 1.0, 0.8])


def _prompts(vocab: int, seed: int = 0, lengths=LENGTHS):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def auto_plan(K, draft_cost=0.3, token_cost=0.1, prior=0.6):
    """A machine-independent cost model for `schedule="auto"` under which rounds verify varying prefixes."""
    from dspark_jax.engine import schedule as sched

    verify_costs, _ = sched.constant_costs(K, token_cost=token_cost)
    return sched.ScheduleParams(jnp.asarray(verify_costs), jnp.float32(draft_cost), jnp.ones((K,), jnp.float32),
                                jnp.full((K,), prior, jnp.float32))


def coupled(target, draft, prompts, **kw):
    kw = {"max_new_tokens": BUDGETS[: len(prompts)], "stop_token_ids": [], "seed": 11, **ROWS, **kw}
    kw = {k: (v[: len(prompts)] if isinstance(v, list) and k != "stop_token_ids" else v) for k, v in kw.items()}
    return dj.generate(target, draft, prompts, sampler="coupled", **kw)


@pytest.fixture(scope="module")
def dspark_pair():
    """A tiny Qwen3 bigram target (softened, so sampled rows really vary) and a DSpark draft right 60% of the
    time; the job's plain coupled answers."""
    from test_spec_greedy import CFG, DRAFT_CFG, SUCCESSOR

    target = synthetic.bigram_target(CFG, successor=SUCCESSOR, seed=1, logit_scale=0.35)
    draft = synthetic.oracle_draft(target, DRAFT_CFG, SUCCESSOR, accuracy=0.6, strength=4.0, seed=3)
    prompts = _prompts(CFG.vocab_size)
    return target, draft, prompts, coupled(target, None, prompts).tokens


CELLS = {  # name -> generate arguments besides K
    "one batch, fixed": dict(schedule="fixed"),
    "one batch, auto": dict(schedule="plan"),
    "continuous 2 slots, auto": dict(schedule="plan", batch_size=2),
    "static groups of 3, fixed": dict(schedule="fixed", batch_size=3, batching="static"),
    "continuous 3 slots, fixed": dict(schedule="fixed", batch_size=3),
    "static groups of 2, auto": dict(schedule="plan", batch_size=2, batching="static"),
}
DEFAULT_CELLS = {1: ("one batch, fixed", "continuous 2 slots, auto"),
                 7: ("one batch, auto", "continuous 2 slots, auto", "static groups of 3, fixed")}


def _cell(K, name):
    marks = [] if name in DEFAULT_CELLS[K] else [pytest.mark.slow]
    return pytest.param(K, name, marks=marks, id=f"K{K}-{name}")


@pytest.mark.parametrize("K, cell", [_cell(K, name) for K in (1, 7) for name in CELLS]
                         + [pytest.param(3, name, marks=pytest.mark.slow, id=f"K3-{name}") for name in CELLS])
def test_speculative_equals_plain_decoding(dspark_pair, K, cell):
    target, draft, prompts, plain = dspark_pair
    kw = dict(CELLS[cell])
    if kw["schedule"] == "plan":
        kw["schedule"] = auto_plan(K)
    result = coupled(target, draft, prompts, draft_length=K, **kw)
    same = [a == b for a, b in zip(result.tokens, plain, strict=True)]
    assert all(same), f"rows differing from plain coupled decoding: {[i for i, s in enumerate(same) if not s]}"
    accepted = sum(x for row in result.stats.accepted_draft_lengths for x in row)
    proposed = sum(x for row in result.stats.proposal_lengths for x in row)
    assert 0 < accepted < proposed, "the job must accept some drafts and reject others"


def test_rejection_sampling_differs_and_greedy_is_unaffected(dspark_pair):
    """The sampler changes sampled rows (the control for the test above) and never a greedy one."""
    target, draft, prompts, plain = dspark_pair
    rejection = dj.generate(target, draft, prompts, max_new_tokens=BUDGETS, stop_token_ids=[], seed=11, **ROWS,
                            draft_length=7, schedule="fixed", sampler="rejection")
    differ = sum(a != b for a, b in zip(rejection.tokens, plain, strict=True))
    assert differ >= 3, f"only {differ} of 6 sampled rows differ between the samplers: too little randomness to test"
    greedy = ROWS["temperature"].index(0.0)
    assert rejection.tokens[greedy] == plain[greedy]


def _proposers():
    from test_deepseek_mtp import _random_target as deepseek_target
    from test_spec_greedy import CFG, random_target

    def dflash():
        target = random_target()
        return target, synthetic.random_draft(target, synthetic.draft_config_for(CFG, num_layers=1, markov_rank=0), seed=2)

    def eagle3():
        target = random_target()
        cfg = synthetic_eagle3.config_for(CFG, target_layer_ids=(0, 1, 2))
        return target, synthetic_eagle3.random_draft(target, cfg, seed=2)

    def mtp():
        target = deepseek_target()
        return target, synthetic_mtp.random_mtp(target, seed=2)

    def prompt_lookup():
        return random_target(), dj.prompt_lookup(draft_length=5, max_ngram=2)

    def dspark():
        target = random_target()
        return target, synthetic.random_draft(target, synthetic.draft_config_for(CFG, num_layers=1, markov_rank=16), seed=2)

    return {"dflash": dflash, "eagle3": eagle3, "mtp": mtp, "prompt_lookup": prompt_lookup, "dspark": dspark}


@pytest.mark.parametrize("proposer", ["dflash", "eagle3", "mtp", "prompt_lookup"])
@pytest.mark.parametrize("cell", ["continuous 2 slots, auto", pytest.param("one batch, fixed", marks=pytest.mark.slow)])
def test_every_proposer_gives_plain_decoding(proposer, cell):
    target, draft = _proposers()[proposer]()
    V = target.config.vocab_size
    prompts = [np.asarray(p) % V for p in _prompts(V, seed=1, lengths=LENGTHS[:5])]
    prompts = [np.concatenate([p, p[: len(p) // 2]]).tolist() for p in prompts]  # repeats, for prompt lookup
    plain = coupled(target, None, prompts).tokens
    K = draft.module.max_draft_length
    kw = dict(CELLS[cell])
    if kw["schedule"] == "plan":
        kw["schedule"] = auto_plan(K)
    result = coupled(target, draft, prompts, **kw)
    assert result.tokens == plain
    if proposer != "prompt_lookup" or kw["schedule"] == "fixed":  # auto may rightly keep n-gram drafts off here
        assert sum(x for row in result.stats.accepted_draft_lengths for x in row) > 0


@pytest.mark.parametrize("proposer", ["dspark", "dflash", "eagle3", "mtp"])
def test_drafts_use_the_noise_of_their_positions(proposer):
    """Draft `k` (position `lengths + k + 1`) is the Gumbel-max token of the distribution it was drawn from, with
    that position's noise: what makes a draft that agrees with the target be accepted."""
    target, draft = _proposers()[proposer]()
    K = draft.module.max_draft_length
    prompts = _prompts(target.config.vocab_size, seed=2, lengths=[3, 11, 6])
    req, _, shapes = generation.build_requests(
        target, prompts, max_new_tokens=8, temperature=[1.0, 0.8, 1.2], top_k=0, top_p=[1.0, 1.0, 0.9], seed=4,
        stop_token_ids=[], confidence_threshold=0.0, extra_capacity=K, sampler="coupled")
    state = spec.start_jit(target.graphdef, target.params, draft.graphdef, draft.params, req, K=K, **shapes)
    proposal = draft.module.propose(state.proposer_state, state.pending, state.lengths, req.sampling, req.keys, K)
    positions = state.lengths[:, None] + 1 + jnp.arange(K)[None, :]
    expected = sampling.coupled(proposal.probs, req.keys, positions)
    np.testing.assert_array_equal(np.asarray(proposal.tokens), np.asarray(expected))


def test_verification_accepts_the_targets_own_draws():
    """A draft drawn from the target's own distributions (as a proposer draws, `token_at` at positions
    `lengths + k + 1`) is accepted whole and the bonus is the target's token after it; a changed draft is
    replaced by the target's token at its position."""
    B, K, V = 4, 5, 300
    keys = sampling.row_keys(jnp.arange(B, dtype=jnp.uint32) + 3, jnp.arange(B, dtype=jnp.uint32))
    params = SamplingParams.create(B, temperature=1.0, sampler="coupled")
    p_target = jax.nn.softmax(2.0 * jax.random.normal(jax.random.key(0), (B, K + 1, V)), axis=-1)
    lengths = jnp.array([4, 9, 17, 30], jnp.int32)
    drafts = jnp.stack([sampling.token_at(p_target[:, k], params, keys, lengths + k + 1, sampling.SALT_DRAFT)
                        for k in range(K)], axis=1)
    stops = jnp.full((B, 1), -1, jnp.int32)
    full = jnp.full((B,), K, jnp.int32)
    accepted, bonus, _ = verify.verify(drafts, None, p_target, full, stops, keys, lengths, sampler="coupled")
    np.testing.assert_array_equal(np.asarray(accepted), K)
    np.testing.assert_array_equal(np.asarray(bonus), np.asarray(sampling.coupled(p_target[:, K], keys, lengths + K + 1)))
    wrong = drafts.at[:, 2].set((drafts[:, 2] + 1) % V)
    accepted, correction, _ = verify.verify(wrong, None, p_target, full, stops, keys, lengths, sampler="coupled")
    np.testing.assert_array_equal(np.asarray(accepted), 2)
    np.testing.assert_array_equal(np.asarray(correction), np.asarray(drafts[:, 2]))


def test_bad_sampler_is_named(dspark_pair):
    target, draft, prompts, _ = dspark_pair
    with pytest.raises(InputError, match="sampler='foo'"):
        dj.generate(target, draft, prompts[:1], max_new_tokens=2, sampler="foo")
    with pytest.raises(InputError, match="sampler"):
        dj.stream(target, None, prompts[:1], max_new_tokens=2, sampler=1)


def test_stream_follows_the_sampler(dspark_pair):
    target, draft, prompts, plain = dspark_pair
    pieces = list(dj.stream(target, draft, prompts[:3], max_new_tokens=BUDGETS[:3], stop_token_ids=[], seed=11,
                            temperature=ROWS["temperature"][:3], top_k=ROWS["top_k"][:3], top_p=ROWS["top_p"][:3],
                            sampler="coupled", schedule=auto_plan(7)))
    assert [sum((p[i] for p in pieces), []) for i in range(3)] == plain[:3]


def test_cli_default_matches_the_library():
    from dspark_jax.tools.commands import common

    assert common.DEFAULT_SAMPLER == generation.DEFAULT_SAMPLER
    assert set(common.SAMPLERS) == set(sampling.SAMPLERS)


# ------------------------------------------------------------------------------------------ batch jobs


@pytest.fixture(scope="module")
def batch_job(tmp_path_factory):
    """`dspark-jax batch` on the tiny pair of `test_batch.py`: -> (run(output, *flags, draft=True), kill(output,
    *flags)) running the real command in a subprocess; the scheduler's cost model is the machine-independent one."""
    import os
    import subprocess

    from test_batch import PROMPTS, batch_command, kill_after_lines
    from tiny_checkpoint import session_pair

    pair = session_pair(tmp_path_factory)
    prompts_file = tmp_path_factory.mktemp("coupled_batch") / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", DSPARK_JAX_PROFILE="0")

    def run(out, *flags, draft=True, rc=0):
        proc = subprocess.run(batch_command(pair, prompts_file, out, *flags, draft=draft), env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == rc, proc.stderr
        return proc

    def kill(out, *flags):
        """Start the job and SIGKILL it once two answers are written. -> answers written."""
        kill_after_lines(batch_command(pair, prompts_file, out, *flags), env, out)
        return out.read_bytes().count(b"\n")

    return run, kill


def test_batch_job_killed_and_resumed_at_another_batch_size(batch_job, tmp_path):
    """`dspark-jax batch --sampler coupled --schedule auto`: a job killed at batch size 1 and resumed at batch size
    2 answers what plain decoding (`--draft none`) answers, and the sidecar does not hold the batch size."""
    from test_batch import answers_by_id

    run, kill = batch_job
    flags = ("--sampler", "coupled", "--schedule", "auto")
    plain_out, out = tmp_path / "plain.jsonl", tmp_path / "answers.jsonl"
    run(plain_out, "--batch-size", "3", *flags, draft=False)
    done_before = kill(out, "--batch-size", "1", *flags)
    resumed = run(out, "--batch-size", "2", *flags)
    assert f"{done_before} already answered" in resumed.stdout
    job = json.loads((tmp_path / "answers.jsonl.job.json").read_text())
    assert job.get("sampler") == "coupled" and "batch_size" not in json.dumps(job)
    answers, plain = answers_by_id(out), answers_by_id(plain_out)
    assert set(answers) == set(plain)
    for key in plain:
        assert answers[key]["tokens"] == plain[key]["tokens"], key


@pytest.mark.slow
def test_batch_job_with_rejection_sampling_under_auto_pins_its_batch_size(batch_job, tmp_path):
    """README: with rejection sampling under the auto schedule a job resumes only at its batch size (refused at
    another), and then equals the uninterrupted job."""
    run, kill = batch_job
    flags = ("--sampler", "rejection", "--schedule", "auto")
    reference, out = tmp_path / "reference.jsonl", tmp_path / "answers.jsonl"
    run(reference, "--batch-size", "2", *flags)
    kill(out, "--batch-size", "2", *flags)
    refused = run(out, "--batch-size", "3", *flags, rc=2)
    assert "batch_size" in refused.stderr
    run(out, "--batch-size", "2", *flags)
    assert out.read_bytes() == reference.read_bytes()


# ------------------------------------------------------------------------------------------ exactness


def test_coupled_draws_match_the_distribution_at_real_vocabulary_size():
    from test_sampler_exact import V, designed_distribution, exact

    p, groups = designed_distribution()
    N, chunk = 2**13, 512
    probs = jnp.asarray(p)
    draw = jax.jit(lambda keys: sampling.coupled(jnp.broadcast_to(probs, (keys.shape[0], V)), keys,
                                                 jnp.full((keys.shape[0],), 9, jnp.int32)))
    tokens = []
    for c in range(N // chunk):
        rows = jnp.arange(c * chunk, (c + 1) * chunk, dtype=jnp.uint32)
        tokens.append(np.asarray(draw(sampling.row_keys(jnp.full(chunk, 13, jnp.uint32), rows))))
    counts = np.bincount(np.concatenate(tokens), minlength=V)
    assert counts[p == 0].sum() == 0
    ex = exact(p)
    # each large token alone, the 1e-6 tier in 8 vocabulary ranges, the rarer tiers (~4 draws in all) pooled with
    # the last range so every bin expects >= 5 draws
    rest = np.concatenate([groups[t] for t in ("1e-8", "1e-10", "1e-30")])
    b = [np.array([i]) for i in groups["big"]] + np.array_split(np.sort(groups["1e-6"]), 8)
    b[-1] = np.concatenate([b[-1], rest])
    observed = np.array([counts[i].sum() for i in b], np.float64)
    expected = np.array([ex[i].sum() for i in b]) * N
    assert expected.min() >= 5 and observed.sum() == N
    pvalue = scistats.chisquare(observed, expected).pvalue
    assert pvalue > 1e-4, f"chi-square p = {pvalue:.2e}"


def test_coupled_generations_follow_the_target_distribution(tmp_path):
    """Whole coupled speculative generations (K = 7, DSpark draft, fixed rounds) of the first three tokens at
    V = 8 against the exact processed target distribution; every row equals plain coupled decoding."""
    import torch
    from hf_models import qwen3
    from spec_helpers import PROMPT, SETTINGS, STEPS, V, empirical, exact_distribution

    N = 2**14
    directory = tmp_path
    hf = qwen3(directory, seed=3, vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    with torch.no_grad():  # sharp logits, as in test_spec_sampling.py
        hf.lm_head.weight.mul_(6.0)
        last = hf(torch.as_tensor([PROMPT + [x] for x in range(V)])).logits[:, -1]
    hf.save_pretrained(directory)
    target = dj.load_target(directory, dtype="float32")
    cfg = synthetic.draft_config_for(target.config, num_layers=1, markov_rank=8, target_layer_ids=(0,), mask_token_id=V - 1)
    draft = synthetic.oracle_draft(target, cfg, last.argmax(-1).numpy(), accuracy=0.7, strength=2.0, seed=4)
    for i, setting in enumerate(SETTINGS):
        ex = exact_distribution(hf, setting).reshape(-1).astype(np.float64)
        ex /= ex.sum()
        kw = dict(max_new_tokens=STEPS, stop_token_ids=[], seed=40 + i, sampler="coupled", **setting)
        result = dj.generate(target, draft, [PROMPT] * N, draft_length=7, schedule="fixed", **kw)
        assert result.tokens == dj.generate(target, None, [PROMPT] * N, **kw).tokens
        observed = empirical(result.tokens) * N
        assert observed[ex == 0].sum() == 0, "an outcome the filters remove was drawn"
        keep = ex * N >= 5
        obs, exp = observed[keep], ex[keep] * N
        smallest = np.argmin(exp)  # the rare outcomes pooled with the least likely kept one
        obs[smallest] += observed[~keep].sum()
        exp[smallest] += ex[~keep].sum() * N
        pvalue = scistats.chisquare(obs, exp).pvalue
        assert pvalue > 1e-4, f"{setting}: chi-square p = {pvalue:.2e}"
