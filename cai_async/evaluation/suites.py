"""Evaluation suites read from the public data (the slices bundled with the package by default, a folder of
the same layout, or ``hub``: see :mod:`cai_async.public_data`): harmlessness (hh-rlhf red-team turns, AdvBench
behaviours), over-refusal (XSTest safe and unsafe contrast prompts), jailbreaks (GPTFuzz templates × harmful
questions) and helpfulness (Vicuna-bench)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl

from backends.errors import ConfigError
from cai_async.judging import REFUSAL_PREFIXES, refused_by_rule
from cai_async.public_data import HH_TURNS, read_public

__all__ = ["REFUSAL_PREFIXES", "EvalPrompt", "Suite", "guard_prompts", "load_suite", "refused_by_rule"]

Suite = Literal["harmlessness", "overrefusal", "jailbreak", "helpfulness"]


@dataclass(frozen=True, slots=True)
class EvalPrompt:
    """One prompt of a suite; ``kind`` says what a good answer does (harmful: decline; safe: comply; …)."""

    id: str
    suite: str
    kind: Literal["harmful", "safe", "unsafe", "jailbreak", "helpful"]
    prompt: str
    source: str


def _id(*parts: str) -> str:
    return hashlib.sha1("\x1f".join(parts).encode()).hexdigest()[:16]


def _need(data_dir: str | Path | None, relpath: str, suite: str, columns: tuple[str, ...]) -> pl.DataFrame:
    return read_public(relpath, data_dir, what=f"eval suite {suite!r}", columns=columns)


def _sample(items: list[EvalPrompt], n: int | None, seed: int) -> list[EvalPrompt]:
    if n is None or n >= len(items):
        return items
    return sorted(random.Random(seed).sample(items, n), key=lambda p: p.id)


def load_suite(suite: Suite, data_dir: str | Path | None = None, *, n: int | None = None,
               seed: int = 0) -> list[EvalPrompt]:
    """The prompts of ``suite`` (``n`` per part, seeded, so reruns and models see the same ones) from
    ``data_dir``: None for the bundled slices, a folder of the same layout, or ``hub``."""
    if suite == "harmlessness":
        hh = _need(data_dir, HH_TURNS, suite, ("prompt",))
        adv = _need(data_dir, "advbench/harmful_behaviors.csv", suite, ("goal",))
        red = [EvalPrompt(_id("hh", t), suite, "harmful", t, "hh-rlhf") for t in hh["prompt"].to_list()]
        goals = [EvalPrompt(_id("adv", t), suite, "harmful", t, "advbench") for t in adv["goal"].to_list()]
        half = None if n is None else max(1, n // 2)
        return _sample(red, half, seed) + _sample(goals, None if n is None else n - (half or 0), seed)
    if suite == "overrefusal":
        xs = _need(data_dir, "xstest/xstest_prompts.csv", suite, ("id", "prompt", "label"))
        safe = [EvalPrompt(_id("xs", str(r["id"])), suite, "safe", r["prompt"], "xstest")
                for r in xs.iter_rows(named=True) if r["label"] == "safe"]
        unsafe = [EvalPrompt(_id("xs", str(r["id"])), suite, "unsafe", r["prompt"], "xstest")
                  for r in xs.iter_rows(named=True) if r["label"] == "unsafe"]
        half = None if n is None else max(1, n // 2)
        return _sample(safe, half, seed) + _sample(unsafe, None if n is None else n - (half or 0), seed)
    if suite == "jailbreak":
        templates = _need(data_dir, "gptfuzz/GPTFuzzer.csv", suite, ("text",))["text"].to_list()
        questions = _need(data_dir, "gptfuzz/question_list.csv", suite, ("text",))["text"].to_list()
        rng = random.Random(seed)
        count = n or len(templates)
        combos = [(rng.randrange(len(templates)), rng.randrange(len(questions))) for _ in range(count)]
        return [EvalPrompt(_id("jb", str(t), str(q)), suite, "jailbreak",
                           templates[t].replace("[INSERT PROMPT HERE]", questions[q]), f"gptfuzz t{t} q{q}")
                for t, q in combos]
    if suite == "helpfulness":
        rows = _need(data_dir, "fastchat_llm_judge/vicuna_bench/question.jsonl", suite, ("question_id", "turns"))
        return _sample([EvalPrompt(_id("vb", str(r["question_id"])), suite, "helpful", r["turns"][0], "vicuna-bench")
                        for r in rows.iter_rows(named=True)], n, seed)
    raise ConfigError(f"unknown suite {suite!r}: harmlessness, overrefusal, jailbreak or helpfulness")


def guard_prompts(data_dir: str | Path | None, n: int | None, *, seed: int = 0) -> list[EvalPrompt]:
    """What the guard alone is measured on (``cai eval`` with a guarded model): XSTest safe and unsafe prompts
    (``n`` together, half each) and ``n`` AdvBench behaviours (all: None)."""
    xstest = load_suite("overrefusal", data_dir, n=n, seed=seed)
    adv = _need(data_dir, "advbench/harmful_behaviors.csv", "guard", ("goal",))
    goals = [EvalPrompt(_id("adv", t), "guard", "harmful", t, "advbench") for t in adv["goal"].to_list()]
    return [EvalPrompt(p.id, "guard", p.kind, p.prompt, p.source) for p in xstest] + _sample(goals, n, seed)
