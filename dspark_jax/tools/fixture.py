"""The fixture pair: a small Qwen3 target trained from scratch here, and DSpark + DFlash drafts trained against it.

    dspark-jax build-fixture --config configs/fixture_pair.yaml [--install]
    (equivalently: python -m dspark_jax.training.fixture --config configs/fixture_pair.yaml)

Stages (each resumable; a finished stage leaves `<output_dir>/stages/<name>.json` and is skipped on re-runs):

1. `split`     the standard library's files (train / held-out by path hash) and every prompt set (test: acceptance is
               reported on these and nothing trains on them; dev: evaluation during draft training; train).
2. `tokenizer` byte-level BPE with the chat special tokens and our Qwen-style chat template.
3. `target`    a Qwen3 model trained from scratch on the train files, chat conversations made from their documented
               functions, and the train prompts' text; validation loss on the held-out files. Saved in HF format.
4. `answers`   the target's own answers to the train and dev prompts (sampled like the reference's regeneration:
               T 0.7, top-p 0.8, top-k 20), as chat JSONL; answers cut by the token budget are dropped.
5. `cache`     target caches (features of the draft layers + final hidden) of the train and dev conversations, and
               of `text_windows` plain-text windows of the train source files (train cache only).
6. `dspark`, `dflash`  the two drafts, each from its recipe in `drafts` (paths filled in by this pipeline).
7. `ship`      the target and both drafts in bf16 (or `ship_dtype`) plus `fixture.json` (provenance and numbers) and
               `heldout_prompts.jsonl` (the test prompts) into `<output_dir>/ship`, and with `--install` into
               `dspark_jax/assets` (the package's built-in pair).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from dspark_jax.errors import ConfigError
from dspark_jax.training import bpe, corpus, lm


@dataclasses.dataclass(frozen=True)
class FixtureConfig:
    output_dir: str = "runs/fixture"
    seed: int = 0
    prompts_dir: str = ""  # empty: $DSPARK_JAX_PROMPTS, else ../shared/data/prompts next to the repository
    heldout_percent: int = 5
    test_per_set: dict = dataclasses.field(default_factory=lambda: {"gsm8k": 64, "humaneval": 32, "mbpp": 32, "mt-bench": 16})
    dev_per_set: dict = dataclasses.field(default_factory=lambda: {"gsm8k": 16, "humaneval": 8, "mbpp": 8, "mt-bench": 8})
    vocab_size: int = 4096
    target: dict = dataclasses.field(default_factory=dict)  # Qwen3 geometry: hidden_size, num_layers, ...
    lm: dict = dataclasses.field(default_factory=dict)  # LMRecipe fields
    conversation_repeats: int = 2
    answers: dict = dataclasses.field(default_factory=dict)
    cache: dict = dataclasses.field(default_factory=dict)
    drafts: dict = dataclasses.field(default_factory=dict)  # name -> recipe YAML path
    ship_dtype: str = "bfloat16"

    @property
    def out(self) -> Path:
        return Path(self.output_dir)


ANSWER_DEFAULTS = dict(max_new_tokens=192, temperature=0.7, top_p=0.8, top_k=20, batch_size=64,
                       max_prompts_per_set=600, function_prompts=800, dev_function_prompts=48)
# text_windows: that many plain-text windows of text_chars characters from the train source files join the train
# cache (supervised everywhere; 0: answers only). The built-in DSpark / DFlash drafts used 1000 x 1200.
CACHE_DEFAULTS = dict(max_length=512, hidden_dtype="bfloat16", min_loss_tokens=14, text_windows=0, text_chars=1200)
TARGET_DEFAULTS = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=768,
                       rope_theta=10000.0, max_position_embeddings=2048, rms_norm_eps=1e-6)


def load_config(path) -> FixtureConfig:
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"fixture config {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    fields = {f.name for f in dataclasses.fields(FixtureConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    for name, defaults in (("answers", ANSWER_DEFAULTS), ("cache", CACHE_DEFAULTS), ("target", TARGET_DEFAULTS),
                           ("lm", {f.name: f.default for f in dataclasses.fields(lm.LMRecipe)})):
        extra = sorted(set(data.get(name) or {}) - set(defaults))
        if extra:
            raise ConfigError(f"{path}: unknown key(s) {extra} in {name!r}; allowed: {sorted(defaults)}")
        data[name] = {**defaults, **(data.get(name) or {})}
    return FixtureConfig(**data)


class Pipeline:
    def __init__(self, cfg: FixtureConfig):
        self.cfg = cfg
        self.out = cfg.out
        (self.out / "stages").mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()

    # --- bookkeeping ----------------------------------------------------------------------------
    def stage(self, name, fn):
        marker = self.out / "stages" / f"{name}.json"
        if marker.exists():
            print(f"[fixture] {name}: done earlier, skipped", flush=True)
            return json.loads(marker.read_text())
        print(f"[fixture] {name} ...", flush=True)
        t = time.perf_counter()
        summary = fn() or {}
        summary["seconds"] = round(time.perf_counter() - t, 1)
        marker.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"[fixture] {name}: {summary['seconds']} s", flush=True)
        return summary

    @property
    def target_dir(self) -> Path:
        return self.out / "target"

    def tokenizer(self):
        from dspark_jax.tokenizer import Tokenizer

        return Tokenizer.from_directory(self.target_dir)

    def split(self):
        return json.loads((self.out / "data" / "split.json").read_text())

    # --- stages ---------------------------------------------------------------------------------
    def run(self) -> dict:
        c = self.cfg
        summaries = {
            "split": self.stage("split", self.do_split),
            "tokenizer": self.stage("tokenizer", self.do_tokenizer),
            "target": self.stage("target", self.do_target),
            "answers": self.stage("answers", self.do_answers),
            "cache": self.stage("cache", self.do_cache),
        }
        for name in c.drafts:
            summaries[name] = self.stage(name, lambda name=name: self.do_draft(name))
        summaries["ship"] = self.stage("ship", lambda: self.do_ship(summaries))
        total = round(time.perf_counter() - self.t0, 1)
        print(f"[fixture] finished in {total} s (this invocation); shipped pair in {self.out / 'ship'}", flush=True)
        return summaries

    def do_split(self):
        c = self.cfg
        root = corpus.stdlib_root()
        train, heldout = corpus.split_files(root, c.heldout_percent)
        prompts = corpus.split_prompts(Path(c.prompts_dir) if c.prompts_dir else corpus.default_prompt_dir(), c.test_per_set,
                                       c.dev_per_set)
        data = self.out / "data"
        data.mkdir(parents=True, exist_ok=True)
        split = {
            "stdlib_root": str(root),
            "train_files": [str(p.relative_to(root)) for p in train],
            "heldout_files": [str(p.relative_to(root)) for p in heldout],
            "prompts": prompts,
        }
        (data / "split.json").write_text(json.dumps(split) + "\n")
        with open(data / "test_prompts.jsonl", "w") as f:
            for name, parts in prompts.items():
                for p in parts["test"]:
                    f.write(json.dumps({"set": name, "turns": [p]}) + "\n")
        with open(data / "dev_prompts.jsonl", "w") as f:
            for name, parts in prompts.items():
                for p in parts["dev"]:
                    f.write(json.dumps({"set": name, "turns": [p]}) + "\n")
        return {"train_files": len(train), "heldout_files": len(heldout),
                "prompts": {n: {k: len(v) for k, v in parts.items()} for n, parts in prompts.items()}}

    def _files(self, which):
        split = self.split()
        root = Path(split["stdlib_root"])
        return [root / p for p in split[which]]

    def do_tokenizer(self):
        split = self.split()
        texts = [t for t in (corpus.read_text(p) for p in self._files("train_files")) if t]
        texts += [p for parts in split["prompts"].values() for p in parts["train"]]
        tok = bpe.train_tokenizer(texts, self.cfg.vocab_size)
        bpe.save_tokenizer(tok, self.target_dir, self.cfg.target["max_position_embeddings"])
        return {"vocab_size": tok.get_vocab_size(), "training_chars": sum(map(len, texts))}

    def _lm_docs(self, files, *, with_prompts: bool, repeats: int):
        tok = self.tokenizer()
        docs, n_conv = [], 0
        for p in files:
            text = corpus.read_text(p)
            if text:
                docs.append(tok.encode(text))
            for conv in corpus.function_conversations(p):
                ids = tok.encode(tok.apply_chat_template(conv["conversations"], add_generation_prompt=False))
                docs.extend([ids] * repeats)
                n_conv += 1
        if with_prompts:
            for parts in self.split()["prompts"].values():
                docs.extend(tok.encode(p) for p in parts["train"])
        order = np.random.default_rng(self.cfg.seed).permutation(len(docs))
        return [docs[i] for i in order], n_conv

    def do_target(self):
        import dspark_jax as dj
        from dspark_jax.config import RopeConfig
        from dspark_jax.models.qwen3 import Qwen3Config
        from dspark_jax.models.qwen3.checkpoint import export_target

        c = self.cfg
        t = c.target
        recipe = lm.LMRecipe(**c.lm)
        tok = self.tokenizer()
        sep = tok.token_id(bpe.ENDOFTEXT)
        docs, n_conv = self._lm_docs(self._files("train_files"), with_prompts=True, repeats=c.conversation_repeats)
        val_docs, _ = self._lm_docs(self._files("heldout_files"), with_prompts=False, repeats=1)
        windows = lm.pack(docs, recipe.seq_len, sep)
        val = lm.pack(val_docs, recipe.seq_len, sep)[: 8 * recipe.batch_size]
        config = Qwen3Config(
            model_type="qwen3", vocab_size=tok.vocab_size, hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
            num_layers=t["num_layers"], num_heads=t["num_heads"], num_kv_heads=t["num_kv_heads"], head_dim=t["head_dim"],
            rms_norm_eps=t["rms_norm_eps"], rope=RopeConfig(theta=float(t["rope_theta"])), tie_word_embeddings=True,
            max_position_embeddings=t["max_position_embeddings"],
        )
        target = lm.init_target(config, recipe.seed)
        target = lm.train(target, windows, val, recipe, self.out / "target_training")
        eos = [tok.token_id(bpe.IM_END), tok.token_id(bpe.ENDOFTEXT)]
        export_target(target, self.target_dir, dtype="float32", eos_token_id=eos, pad_token_id=tok.token_id(bpe.ENDOFTEXT))
        loaded = dj.load_target(self.target_dir, dtype="float32")
        val_loss = lm.evaluate(loaded, val, recipe.batch_size)
        return {"params": loaded.num_params, "train_windows": int(len(windows)), "train_tokens_available": int(windows.size),
                "tokens_seen": recipe.steps * recipe.batch_size * recipe.seq_len, "conversations": n_conv,
                "val_windows": int(len(val)), "val_loss": round(val_loss, 4)}

    def do_answers(self):
        a = self.cfg.answers
        split = self.split()
        rng = np.random.default_rng(self.cfg.seed + 1)

        def function_prompts(files, n):
            convs = [cv["conversations"][0]["content"] for p in files for cv in corpus.function_conversations(p)]
            pick = rng.permutation(len(convs))[:n]
            return [convs[i] for i in sorted(pick)]

        train = [p for parts in split["prompts"].values() for p in parts["train"][: a["max_prompts_per_set"]]]
        train += function_prompts(self._files("train_files"), a["function_prompts"])
        dev = [p for parts in split["prompts"].values() for p in parts["dev"]]
        dev += function_prompts(self._files("heldout_files"), a["dev_function_prompts"])
        stats = {}
        for name, prompts in (("train", train), ("dev", dev)):
            stats[name] = self._answer(prompts, self.out / "data" / f"{name}.jsonl", seed=len(name))
        return stats

    def _answer(self, prompts, path: Path, seed: int):
        from tqdm import tqdm

        import dspark_jax as dj

        a = self.cfg.answers
        target = dj.load_target(self.target_dir, dtype="float32")
        tok = target.tokenizer
        kept = dropped = 0
        lengths = []
        encoded = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
                   for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths: few prompt buckets
        with open(path, "w") as f:
            for start in tqdm(range(0, len(prompts), a["batch_size"]), desc=f"answers {path.stem}", dynamic_ncols=True):
                rows = order[start : start + a["batch_size"]]
                batch = [prompts[i] for i in rows]
                ids = [encoded[i] for i in rows]
                res = dj.generate(target, None, ids, max_new_tokens=a["max_new_tokens"], temperature=a["temperature"],
                                  top_p=a["top_p"], top_k=a["top_k"], seed=seed, row_ids=rows)
                for p, tokens, reason in zip(batch, res.tokens, res.stats.finish_reasons, strict=True):
                    if reason != "stop":  # cut by the budget: its end of turn would be ours, not the target's
                        dropped += 1
                        continue
                    answer = tok.decode(tokens[:-1], skip_special_tokens=False)
                    f.write(json.dumps({"conversations": [{"role": "user", "content": p},
                                                          {"role": "assistant", "content": answer}]}) + "\n")
                    kept += 1
                    lengths.append(len(tokens))
        return {"prompts": len(prompts), "kept": kept, "dropped_unfinished": dropped,
                "mean_answer_tokens": round(float(np.mean(lengths)), 1) if lengths else 0}

    def _cache_layer_ids(self):
        ids = None
        for name, path in self.cfg.drafts.items():
            from dspark_jax.training.recipe import load_recipe

            r = load_recipe(path, self._draft_overrides(name))
            if ids is not None and tuple(r.draft.target_layer_ids) != ids:
                raise ConfigError("the fixture's drafts must share target_layer_ids (they train on one cache)")
            ids = tuple(r.draft.target_layer_ids)
        return ids

    def _text_windows(self, n: int, chars: int) -> list[str]:
        """`n` windows of `chars` characters of the train source files: a file drawn with probability proportional
        to its length, a start drawn uniformly and moved back to the start of its line (seeded: reproducible)."""
        rng = np.random.default_rng(self.cfg.seed + 2)
        texts = [t for t in (corpus.read_text(p) for p in self._files("train_files")) if t and len(t) > chars]
        weights = np.asarray([len(t) - chars for t in texts], np.float64)
        windows = []
        for i in rng.choice(len(texts), size=n, p=weights / weights.sum()):
            t = texts[i]
            start = t.rfind("\n", 0, int(rng.integers(0, len(t) - chars + 1))) + 1
            windows.append(t[start : start + chars])
        return windows

    def do_cache(self):
        import dspark_jax as dj
        from dspark_jax.training.data import read_jsonl, tokenize_record
        from dspark_jax.training.target_cache import build_cache

        c = self.cfg.cache
        target = dj.load_target(self.target_dir, dtype="float32")
        tok = target.tokenizer
        layer_ids = self._cache_layer_ids()
        if c["text_windows"]:
            with open(self.out / "data" / "train_text.jsonl", "w") as f:
                for w in self._text_windows(c["text_windows"], c["text_chars"]):
                    f.write(json.dumps({"text": w}) + "\n")
        out = {}
        for name in ("train", "dev"):
            srcs = [self.out / "data" / f"{name}.jsonl"]
            if name == "train" and c["text_windows"]:
                srcs.append(self.out / "data" / "train_text.jsonl")
            n = sum(1 for s in srcs for _ in read_jsonl(s))
            samples = (tokenize_record(tok, r, max_length=c["max_length"]) for s in srcs for r in read_jsonl(s))
            cache = build_cache(target, samples, self.out / "cache" / name, target_layer_ids=layer_ids,
                                hidden_dtype=c["hidden_dtype"], min_loss_tokens=c["min_loss_tokens"], total=n,
                                metadata={"target_model_name_or_path": str(self.target_dir),
                                          "source_jsonl_paths": [str(s) for s in srcs],
                                          "max_length": c["max_length"], "chat_template": "fixture (Qwen layout)"})
            out[name] = {"samples": len(cache), "tokens": int(cache.lengths.sum()),
                         "supervised_tokens": int(sum(int(cache[i].loss_mask.sum()) for i in range(len(cache))))}
        return out

    def _draft_overrides(self, name):
        return {"target": str(self.target_dir), "train_cache": str(self.out / "cache" / "train"),
                "eval_cache": str(self.out / "cache" / "dev"), "output_dir": str(self.out / name),
                "eval.prompts": str(self.out / "data" / "dev_prompts.jsonl")}

    def do_draft(self, name):
        from dspark_jax.training.recipe import load_recipe
        from dspark_jax.training.trainer import DraftTrainer

        recipe = load_recipe(self.cfg.drafts[name], self._draft_overrides(name))
        trainer = DraftTrainer(recipe)
        records = trainer.train()
        path = trainer.export(dtype="float32")
        last = records[-1] if records else json.loads((recipe.output / "metrics.jsonl").read_text().splitlines()[-1])
        return {"draft": str(path), "steps": trainer.step, "final_loss": last.get("loss"), "eval": last.get("eval")}

    def do_ship(self, summaries):
        import dspark_jax as dj
        from dspark_jax.models.qwen3.checkpoint import export_target
        from dspark_jax.proposers import dspark_checkpoint, eagle3_checkpoint
        from dspark_jax.proposers.eagle3 import Eagle3Config

        ship = self.out / "ship"
        if ship.exists():
            shutil.rmtree(ship)
        dt = self.cfg.ship_dtype
        target = dj.load_target(self.target_dir, dtype=dt)
        export_target(target, ship / "target", dtype=dt)
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            shutil.copy2(self.target_dir / name, ship / "target" / name)
        base = json.loads((self.target_dir / "config.json").read_text())
        names = {"dspark": "dspark_draft", "dflash": "dflash_draft", "eagle3": "eagle3_draft"}
        for name in self.cfg.drafts:
            draft = dj.load_draft(self.out / name / "draft", dtype=dt)
            module = eagle3_checkpoint if isinstance(draft.config, Eagle3Config) else dspark_checkpoint
            module.export_draft(draft, ship / names.get(name, name), dtype=dt, base_config=base)
        shutil.copy2(self.out / "data" / "test_prompts.jsonl", ship / "heldout_prompts.jsonl")
        info = {"config": dataclasses.asdict(self.cfg), "stages": summaries,
                "recipes": {n: str(p) for n, p in self.cfg.drafts.items()}}
        (ship / "fixture.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in ship.iterdir() if p.is_dir()}
        return {"dtype": dt, "bytes": sizes}


def install(ship: Path) -> Path:
    """Copy a shipped pair into the package's `assets` (the built-in default of `load_target` / `load_draft`)."""
    from dspark_jax import assets

    root = assets.ROOT
    for sub in ("target", "dspark_draft", "dflash_draft", "eagle3_draft"):
        if not (ship / sub).exists():  # a pipeline that trained only some of the drafts
            continue
        if (root / sub).exists():
            shutil.rmtree(root / sub)
        shutil.copytree(ship / sub, root / sub)
    for name in ("fixture.json", "heldout_prompts.jsonl"):
        shutil.copy2(ship / name, root / name)
    return root


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="fixture recipe, e.g. configs/fixture_pair.yaml")
    parser.add_argument("--output-dir", default=None, help="override the recipe's output_dir")
    parser.add_argument("--install", action="store_true", help="copy the result into dspark_jax/assets (the built-in pair)")


def run(args) -> int:
    cfg = load_config(args.config)
    if args.output_dir:
        cfg = dataclasses.replace(cfg, output_dir=args.output_dir)
    Pipeline(cfg).run()
    if args.install:
        print(f"[fixture] installed into {install(cfg.out / 'ship')}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dspark_jax.training.fixture", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
