"""`dspark-jax calibrate`: sequential temperature scaling (STS) of a draft's confidences, and per-position
acceptance rates for the scheduler (docs/algorithm.md §4.3).

It decodes prompts with full blocks (threshold 0, fixed schedule), records per round the confidence logits
`l_1..l_K` and the prefix-acceptance labels `y_k` (1 iff drafts 1..k were all accepted; positions after an
accepted stop token are left out), splits the prompts into a fitting half and a held-out half, fits one
temperature per position left to right on the fitting half (minimum 20-bin ECE of the cumulative survival,
grid of 200 log-spaced values in [0.1, 10]), and reports per-position ECE, AUROC and Brier before and after
on the held-out half, with the ECE noise floor (the expected ECE of a perfectly calibrated predictor with the
same predictions and count). A draft without a confidence head gets only the per-position conditional
acceptance rates. Writes `calibration.json` next to the draft (`engine.schedule.load_calibration` reads it).

Rounds are sampled at temperature 1 by default: the confidence head is trained on the soft label
`1 - TV(p_d, p_t)`, the acceptance probability of rejection sampling at temperature 1 (docs/algorithm.md
§4.3). Under greedy decoding acceptance is an argmax match, a different quantity that one temperature per
position cannot map the confidences onto.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax import compiling
from dspark_jax.engine import schedule as sched
from dspark_jax.engine import spec

ECE_BINS = 20
AUC_BINS = 1000
GRID = np.exp(np.linspace(np.log(0.1), np.log(10.0), 200))
CLAMP = 1e-8
DEFAULT_TEMPERATURE = 1.0  # sampling temperature of the calibration rounds (see the module docstring)
FLOOR_DRAWS = 200


# ------------------------------------------------------------------------------------------- metrics


def _clamped(pred):
    return np.clip(np.asarray(pred, np.float64), CLAMP, 1.0 - CLAMP)


def ece(pred, label) -> float:
    """Expected calibration error with 20 equal-width bins: sum_b |mean pred - mean label| * count_b / total."""
    pred, label = _clamped(pred), np.asarray(label, np.float64)
    if pred.size == 0:
        return float("nan")
    b = np.clip(np.floor(pred * ECE_BINS).astype(int), 0, ECE_BINS - 1)
    sp = np.bincount(b, pred, minlength=ECE_BINS)
    sl = np.bincount(b, label, minlength=ECE_BINS)
    return float(np.sum(np.abs(sp - sl)) / pred.size)


def ece_grid(pred, label) -> np.ndarray:
    """`ece` of every row of `pred [G, N]` against `label` (`[N]`, or `[G, N]`: one label row per row) at once."""
    pred = np.clip(pred, CLAMP, 1.0 - CLAMP)
    G, N = pred.shape
    b = np.clip(np.floor(pred * ECE_BINS).astype(int), 0, ECE_BINS - 1) + ECE_BINS * np.arange(G)[:, None]
    sp = np.bincount(b.ravel(), pred.ravel(), minlength=G * ECE_BINS).reshape(G, ECE_BINS)
    sl = np.bincount(b.ravel(), np.broadcast_to(label, (G, N)).ravel(), minlength=G * ECE_BINS).reshape(G, ECE_BINS)
    return np.sum(np.abs(sp - sl), axis=1) / max(N, 1)


def ece_floor(pred, draws: int = FLOOR_DRAWS, seed: int = 0) -> float:
    """The ECE noise floor: mean `ece` of labels drawn from Bernoulli(pred) itself (a perfectly calibrated
    predictor with these predictions), over `draws` draws. It shrinks like sqrt(occupied bins / n)."""
    pred = _clamped(pred)
    if pred.size == 0:
        return float("nan")
    labels = np.random.default_rng(seed).uniform(size=(draws, pred.size)) < pred[None, :]
    return float(np.mean(ece_grid(np.broadcast_to(pred, labels.shape), labels.astype(np.float64))))


def auroc(pred, label) -> float:
    """AUROC from 1000-bin positive / negative histograms; ties within a bin count one half; NaN without both
    classes."""
    pred, label = _clamped(pred), np.asarray(label) > 0.5
    b = np.clip(np.floor(pred * AUC_BINS).astype(int), 0, AUC_BINS - 1)
    pos = np.bincount(b[label], minlength=AUC_BINS).astype(np.float64)
    neg = np.bincount(b[~label], minlength=AUC_BINS).astype(np.float64)
    P, N = pos.sum(), neg.sum()
    if P == 0 or N == 0:
        return float("nan")
    below = np.cumsum(neg) - neg
    return float((np.sum(pos * below) + 0.5 * np.sum(pos * neg)) / (P * N))


def brier(pred, label) -> float:
    pred = _clamped(pred)
    return float(np.mean((pred - np.asarray(label, np.float64)) ** 2)) if pred.size else float("nan")


# ------------------------------------------------------------------------------------------- data


def labels(accepted: np.ndarray, terminated: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
    """Prefix-acceptance labels `y [N, K]` (1 iff drafts 0..k accepted) and the mask of positions that count
    (all K, or the accepted ones up to a stop token)."""
    k = np.arange(K)[None, :]
    y = (k < accepted[:, None]).astype(np.float64)
    effective = np.where(terminated, accepted, K)
    return y, k < effective[:, None]


def fit_temperatures(logits: np.ndarray, y: np.ndarray, mask: np.ndarray) -> list[float]:
    """STS: for k = 1..K in order, the grid temperature minimising the ECE of
    `prod_{i<k} sigmoid(l_i / T_i) * sigmoid(l_k / T)` against `y_k`, earlier temperatures fixed."""
    K = logits.shape[1]
    temps, prefix = [], np.ones(logits.shape[0])
    for k in range(K):
        m = mask[:, k]
        if not np.any(m):
            temps.append(temps[-1] if temps else 1.0)
        else:
            pred = prefix[m][None, :] / (1.0 + np.exp(-logits[m, k][None, :] / GRID[:, None]))
            temps.append(float(GRID[int(np.argmin(ece_grid(pred, y[m, k])))]))
        prefix = prefix / (1.0 + np.exp(-logits[:, k] / temps[-1]))
    return temps


def survival(logits: np.ndarray, temps) -> np.ndarray:
    return np.cumprod(1.0 / (1.0 + np.exp(-logits / np.asarray(temps)[None, :])), axis=1)


def survival_rates(y: np.ndarray, mask: np.ndarray) -> list[float]:
    """Observed prefix survival per position, `mean y_k` over the positions that count. Non-increasing in k: the
    rows a stop leaves out of position k had `y_{k-1} = 1`."""
    return [float(np.mean(y[mask[:, k], k])) if np.any(mask[:, k]) else float("nan") for k in range(y.shape[1])]


def acceptance_rates(accepted: np.ndarray, mask: np.ndarray, K: int) -> list[float]:
    """Per-position conditional acceptance `P(draft k accepted | drafts < k accepted)`."""
    out = []
    for k in range(K):
        reached = (accepted >= k) & mask[:, k]
        out.append(float(np.mean(accepted[reached] > k)) if np.any(reached) else (out[-1] if out else 0.0))
    return out


def per_position(pred: np.ndarray, y: np.ndarray, mask: np.ndarray) -> dict[str, list[float]]:
    K = y.shape[1]
    cols = [(pred[mask[:, k], k], y[mask[:, k], k]) for k in range(K)]
    return {"ece": [ece(p, t) for p, t in cols], "ece_floor": [ece_floor(p) for p, _ in cols],
            "auroc": [auroc(p, t) for p, t in cols], "brier": [brier(p, t) for p, t in cols],
            "mean_pred": [float(np.mean(p)) if p.size else float("nan") for p, _ in cols],
            "count": [int(len(t)) for _, t in cols]}


# ------------------------------------------------------------------------------------------- collection


@functools.partial(compiling.jit, static_argnames=("target_graph", "proposer_graph", "K", "capacity"), donate_argnames=("state",))
def _round(target_graph, target_params, proposer_graph, proposer_params, state, *, K, capacity):
    """One fixed round, returning also its confidence logits, accepted drafts and stop flags per row."""
    target, proposer = nnx.merge(target_graph, target_params), nnx.merge(proposer_graph, proposer_params)
    req = state.req
    proposal = proposer.propose(state.proposer_state, state.pending, state.lengths, req.sampling, req.keys, K)
    active = ~state.done
    new = spec.step(target, proposer, state, K, capacity)
    rows = jnp.arange(active.shape[0])
    at = jnp.minimum(state.rounds, new.accepted_lengths.shape[1] - 1)
    accepted = new.accepted_lengths[rows, at]
    terminated = new.acceptance_lengths[rows, at] == accepted
    conf = proposal.confidence_logits if proposal.confidence_logits is not None else jnp.zeros((active.shape[0], K))
    return new, conf, accepted, terminated, active


def collect(target, draft, prompts, *, max_new_tokens: int = 128, batch_size: int = 16,
            temperature: float = DEFAULT_TEMPERATURE,
            seed: int = 0, log=print) -> dict[str, np.ndarray]:
    """Decode `prompts` (token lists) with full blocks; -> per round: confidence logits `[N, K]`, accepted
    drafts `[N]`, stop flags `[N]`, prompt index `[N]`."""
    from dspark_jax.engine import generation

    K = draft.module.max_draft_length
    rows = {"logits": [], "accepted": [], "terminated": [], "prompt": []}
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo: lo + batch_size]
        req, _, shapes = generation.build_requests(
            target, chunk, max_new_tokens=max_new_tokens, temperature=temperature, top_k=0, top_p=1.0, seed=seed,
            stop_token_ids=None, confidence_threshold=0.0, extra_capacity=K,
        )
        state = spec.start_jit(target.graphdef, target.params, draft.graphdef, draft.params, req, K=K, **shapes)
        while not bool(np.all(np.asarray(state.done)[: len(chunk)])):
            state, conf, acc, term, active = _round(target.graphdef, target.params, draft.graphdef, draft.params, state,
                                                    K=K, capacity=shapes["capacity"])
            active = np.asarray(active)[: len(chunk)]
            idx = np.nonzero(active)[0]
            rows["logits"].append(np.asarray(conf, np.float64)[idx])
            rows["accepted"].append(np.asarray(acc)[idx])
            rows["terminated"].append(np.asarray(term)[idx])
            rows["prompt"].append(lo + idx)
        log(f"calibrate: prompts {lo}..{lo + len(chunk) - 1}: {sum(len(x) for x in rows['accepted'])} rounds so far")
    return {k: np.concatenate(v) for k, v in rows.items()}


def calibrate(target, draft, prompts, *, heldout_every: int = 2, save_rounds=None, log=print,
              **kwargs) -> tuple[sched.Calibration, dict]:
    """Collect rounds (`collect`'s keyword arguments; also saved to `save_rounds` (.npz) if given), fit on the
    prompts not held out (every `heldout_every`-th prompt, starting at index 1, is held out), and measure
    before / after on the held-out ones. -> (calibration, report)."""
    data = collect(target, draft, prompts, log=log, **kwargs)
    if save_rounds:
        np.savez(save_rounds, **data)
    cal, report = fit_and_report(data, bool(draft.module.has_confidence), heldout_every=heldout_every)
    report["sampling_temperature"] = float(kwargs.get("temperature", DEFAULT_TEMPERATURE))
    report["max_new_tokens"] = int(kwargs.get("max_new_tokens", 128))
    report["prompts"] = len(prompts)
    return cal, report


def fit_and_report(data: dict, has_conf: bool, *, heldout_every: int = 2) -> tuple[sched.Calibration, dict]:
    """STS fit and report from collected rounds (`collect`'s arrays); whole prompts are either fitted on or held
    out, never both."""
    K = data["logits"].shape[1]
    y, mask = labels(data["accepted"], data["terminated"], K)
    held = data["prompt"] % heldout_every == 1
    fit = ~held
    if not np.any(fit) or not np.any(held):
        raise ValueError("calibrate needs rounds from both fitting and held-out prompts")
    acc = acceptance_rates(data["accepted"][fit], mask[fit], K)
    report = {"rounds_fit": int(fit.sum()), "rounds_heldout": int(held.sum()), "K": K,
              # conditional P(draft k accepted | drafts < k accepted): need not be monotone in k
              "acceptance_fit": acc, "acceptance_heldout": acceptance_rates(data["accepted"][held], mask[held], K),
              # observed prefix survival mean y_k: non-increasing in k
              "survival_fit": survival_rates(y[fit], mask[fit]), "survival_heldout": survival_rates(y[held], mask[held])}
    if has_conf:
        temps = fit_temperatures(data["logits"][fit], y[fit], mask[fit])
        report["before"] = per_position(survival(data["logits"][held], [1.0] * K), y[held], mask[held])
        report["after"] = per_position(survival(data["logits"][held], temps), y[held], mask[held])
        report["temperatures"] = temps
        report["reliability"] = _reliability(data["logits"][held], y[held], mask[held], temps)
    else:
        temps = None
        # the scheduler's survival estimate for a head-less draft: products of the fitted acceptance rates
        pred = np.broadcast_to(np.cumprod(acc), y[held].shape)
        report["after"] = per_position(pred, y[held], mask[held])
    return sched.Calibration(None if temps is None else tuple(temps), tuple(acc)), report


def _reliability(logits, y, mask, temps) -> dict:
    """Per position, per 10-bin confidence bucket: mean predicted survival and observed rate, before/after."""
    out = {}
    for name, t in (("before", [1.0] * len(temps)), ("after", temps)):
        pred = survival(logits, t)
        rows = []
        for k in range(y.shape[1]):
            p, lab = pred[mask[:, k], k], y[mask[:, k], k]
            b = np.clip(np.floor(p * 10).astype(int), 0, 9)
            rows.append([[float(p[b == i].mean()), float(lab[b == i].mean()), int((b == i).sum())]
                         for i in range(10) if np.any(b == i)])
        out[name] = rows
    return out


def write(directory, cal: sched.Calibration, report: dict) -> Path:
    path = Path(directory) / sched.CALIBRATION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)  # --output may name a new directory
    data = cal.to_json()
    data["report"] = {k: v for k, v in report.items() if k != "reliability"}
    path.write_text(json.dumps(_finite(data), indent=1) + "\n")
    return path


def _finite(x):
    if isinstance(x, float):
        return None if not np.isfinite(x) else round(x, 6)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def markdown(report: dict) -> str:
    """The report as markdown: a settings line, the per-position held-out table, the rates the scheduler reads."""
    K = report["K"]
    f = lambda x: "nan" if x is None or not np.isfinite(x) else f"{x:.4f}"  # noqa: E731
    settings = [f"rounds: {report['rounds_fit']} fitting, {report['rounds_heldout']} held out"]
    if "prompts" in report:
        settings.append(f"{report['prompts']} prompts (every other one held out)")
    if "sampling_temperature" in report:
        settings.append(f"sampling temperature {report['sampling_temperature']:g}, "
                        f"max_new_tokens {report['max_new_tokens']}, full blocks (threshold 0)")
    lines = ["; ".join(settings), ""]
    if report.get("command"):
        lines = [f"Run (from the repository root): `{report['command']}`", ""] + lines
    if "before" in report:
        lines += ["Held-out prompts. `survival`: observed prefix survival `mean y_k`; `pred`: mean predicted survival; "
                  "`floor`: expected ECE of a perfectly calibrated predictor with the after-STS predictions and this n.",
                  "",
                  "| position | T | survival | pred before | pred after | ECE before | ECE after | floor | AUROC before "
                  "| AUROC after | Brier before | Brier after | n |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        b, a = report["before"], report["after"]
        for k in range(K):
            lines.append(f"| {k + 1} | {report['temperatures'][k]:.3g} | {f(report['survival_heldout'][k])} | "
                         f"{f(b['mean_pred'][k])} | {f(a['mean_pred'][k])} | {f(b['ece'][k])} | {f(a['ece'][k])} | "
                         f"{f(a['ece_floor'][k])} | {f(b['auroc'][k])} | {f(a['auroc'][k])} | {f(b['brier'][k])} | "
                         f"{f(a['brier'][k])} | {a['count'][k]} |")
        lines += ["", f"mean over positions: ECE before {f(np.mean(b['ece']))}, after {f(np.mean(a['ece']))}, "
                      f"floor {f(np.mean(a['ece_floor']))}", ""]
        lines += ["Conditional acceptance `P(draft k accepted | drafts < k accepted)` (the scheduler's prior; need not "
                  "be monotone):", "", "| position | fit | held out |", "|---|---|---|"]
        for k in range(K):
            lines.append(f"| {k + 1} | {f(report['acceptance_fit'][k])} | {f(report['acceptance_heldout'][k])} |")
    else:
        a = report["after"]
        lines += ["Conditional acceptance `P(draft k accepted | drafts < k accepted)`; the survival predicted for the "
                  "held-out rounds is the product of the fitted rates up to k.", "",
                  "| position | acceptance (fit) | acceptance (held out) | survival (held out) | predicted survival "
                  "| ECE | floor | Brier | n |", "|---|---|---|---|---|---|---|---|---|"]
        for k in range(K):
            lines.append(f"| {k + 1} | {f(report['acceptance_fit'][k])} | {f(report['acceptance_heldout'][k])} | "
                         f"{f(report['survival_heldout'][k])} | {f(a['mean_pred'][k])} | {f(a['ece'][k])} | "
                         f"{f(a['ece_floor'][k])} | {f(a['brier'][k])} | {a['count'][k]} |")
    return "\n".join(lines) + "\n"


def reliability_plot(path, report: dict):
    """Reliability diagram per position (predicted survival vs observed), before and after STS."""
    from dspark_jax.tools.bench import _pyplot, save_figure

    rel = report.get("reliability")
    if not rel:
        return None
    plt = _pyplot()
    K = report["K"]
    fig, axes = plt.subplots(1, K, figsize=(2.6 * K, 2.8), dpi=100, sharey=True)
    for k, ax in enumerate(np.atleast_1d(axes)):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        for name in ("before", "after"):
            pts = rel[name][k]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
        ax.set_title(f"position {k + 1}")
        ax.set_xlabel("predicted survival")
    np.atleast_1d(axes)[0].set_ylabel("observed")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------- CLI


def add_arguments(parser):
    from dspark_jax.tools.commands.common import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--prompts", nargs="+", required=True, help="JSONL prompt files ({\"turns\": [...]} lines)")
    parser.add_argument("--num-prompts", type=int, default=None, help="use at most this many prompts in all")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                        help="sampling temperature of the calibration rounds (default 1: what the confidence head "
                             "predicts; docs/algorithm.md §4.3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-rounds", default=None, help="also save the collected rounds here (.npz)")
    parser.add_argument("--no-chat", action="store_true", help="feed the first turn as raw text")
    parser.add_argument("--output", default=None, help="directory for calibration.json (default: the draft's)")
    parser.add_argument("--report", default=None, help="also write the report (markdown, JSON, reliability PNG) here")
    parser.add_argument("--report-prefix", default="", help="file name prefix of the report files (e.g. 'dspark_')")


def command_line() -> str:
    """The command as run, for the report: the arguments as given (pass relative paths to keep it portable),
    less `--save-rounds` (a scratch output)."""
    import shlex
    import sys

    if sys.argv[1:2] != ["calibrate"]:
        return ""
    argv, kept = sys.argv[2:], []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--save-rounds":
            skip = True
        elif not a.startswith("--save-rounds="):
            kept.append(a)
    return "dspark-jax calibrate " + " ".join(shlex.quote(a) for a in kept)


def run(args) -> int:
    from dspark_jax.errors import InputError
    from dspark_jax.tools import batch
    from dspark_jax.tools.commands.common import load_models

    target, draft = load_models(args)
    if draft is None or draft.directory is None:
        raise InputError("calibrate needs a draft checkpoint directory (--draft DIR)")
    tok = target.tokenizer
    chat = not args.no_chat and bool(tok.chat_template)
    prompts = []
    for f in args.prompts:
        prompts += [tok.encode(batch.prompt_text(p, tok, chat), add_special_tokens=not chat) for p in batch.read_prompts(f).prompts]
    prompts = prompts[: args.num_prompts] if args.num_prompts else prompts
    if len(prompts) < 2:
        raise InputError("calibrate needs at least 2 prompts (half are held out)")
    cal, report = calibrate(target, draft, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            temperature=args.temperature, seed=args.seed, save_rounds=args.save_rounds)
    report["command"] = command_line()
    path = write(args.output or draft.directory, cal, report)
    print(markdown(report))
    print(f"wrote {path}")
    if args.report:
        out = Path(args.report)
        out.mkdir(parents=True, exist_ok=True)
        pre = args.report_prefix
        (out / f"{pre}calibration.md").write_text(markdown(report))
        (out / f"{pre}calibration.json").write_text(json.dumps(_finite(report), indent=1) + "\n")
        reliability_plot(out / f"{pre}reliability.png", report)
    return 0
