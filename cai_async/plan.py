"""``cai plan``: before spending, estimate a recipe's calls, input/output tokens, dollars and the wall time its
endpoints' rate limits allow. Prompt tokens are counted with the model's own tokenizer where one is at hand (a
local GGUF's), otherwise approximated (4 characters a token; a hosted model's tokenizer cannot be fetched
offline); outputs are counted at their ``max_tokens`` cap, so the dollar figure leans high. The run's summary
sets the estimate beside what was actually spent."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from backends.errors import CaiError
from cai_async.constitution_io import load_constitution

__all__ = ["StagePlan", "plan_recipe"]

_PER_MESSAGE = 4


Count = Callable[[str], int]


def _approximate(text: str) -> int:
    return len(text) // 4 + _PER_MESSAGE


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _token_counter(recipe: Any) -> tuple[Count, str]:
    """The tokenizer of the first group served wholly by one local GGUF model, else the approximation."""
    for endpoints in recipe.engine.groups.values():
        models = {e.model for e in endpoints if e.backend == "llamacpp"}
        if len(models) != 1 or len(models) != len({e.model for e in endpoints}):
            continue
        try:
            from llama_cpp import Llama

            from backends.llamacpp import check_gguf, embedded_model_path

            model = models.pop()
            path = embedded_model_path() if model in ("", "embedded") else check_gguf(model)
            with _quiet_stderr():  # llama.cpp notes a context-size warning even with verbose=False
                vocab = Llama(model_path=str(path), vocab_only=True, verbose=False, n_ctx=64)
        except (ImportError, CaiError, ValueError):
            continue

        def count(text: str, vocab: Any = vocab) -> int:
            return len(vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)) + _PER_MESSAGE

        return count, f"prompt tokens counted with the tokenizer of {path.name}"
    return _approximate, "approximate prompt tokens: 4 characters a token + 4 a message"


@dataclass
class StagePlan:
    """Estimated work of one stage on one endpoint group."""

    stage: str
    group: str
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    rounds: int = 1
    """Calls that must follow each other (initial → critique → revision): batch mode's rounds of batches."""
    notes: list[str] = field(default_factory=list)

    def add(self, calls: int, input_tokens: int, output_tokens: int) -> None:
        self.calls += calls
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens


def _prompts(source: Any) -> list[str]:
    try:
        return [r.prompt for r in source.iter()]  # the texts only, not a row object each
    except CaiError:
        return []


def _plan_sl(recipe: Any, count: Count) -> list[StagePlan]:
    sl = recipe.sl
    prompts = _prompts(sl)
    constitution = load_constitution(sl.constitution).with_weights(sl.principle_weights)
    request = max((len(p.critique_request(teach=sl.few_shot > 0)) + len(p.revision)) // 4
                  for p in constitution.principles)
    steps = _steps_per_pass(constitution, sl.draw)
    policy = StagePlan("sl", sl.policy_role, rounds=1 if sl.response_column is None else 0)
    critic = StagePlan("sl", sl.critic_role, rounds=2 * sl.num_revisions * max(1, round(steps)))
    revision_role = sl.revision_role or sl.policy_role
    reviser = policy if revision_role == sl.policy_role else StagePlan("sl", revision_role)
    for text in prompts:
        base = count(text)
        if sl.response_column is None:
            policy.add(1, base, sl.max_tokens)
        calls = round(sl.num_revisions * steps)
        context = base + sl.max_tokens + request
        critic.add(calls, calls * context, calls * sl.critique_max_tokens)
        reviser.add(calls, calls * (context + sl.critique_max_tokens + request), calls * sl.revision_max_tokens)
    policy.notes.append(f"{len(prompts)} prompts; every round assumed to run (early stop only saves)")
    if steps != 1:
        critic.notes.append(f"{steps:g} principles per pass on average (draw: all)")
    if sl.export.helpful is not None:
        share = sl.export.helpful.ratio
        needed = math.ceil(share / (1 - share) * len(prompts)) if share else 0
        policy.add(needed, needed * 40, needed * sl.export.helpful.max_tokens)
        policy.notes.append(f"{needed} helpfulness answers for the sft mix")
    return [policy, critic] if reviser is policy else [policy, critic, reviser]


def _steps_per_pass(constitution: Any, draw: str | None) -> float:
    """Expected critique → revision steps in one pass: 1, or with ``draw: all`` the enabled principles, each
    counted by its chance of being applied (weight ÷ the heaviest)."""
    if (draw or constitution.draw) != "all":
        return 1.0
    weights: list[float] = [p.weight for p in constitution.principles if p.weight > 0]
    return sum(w / max(weights) for w in weights)


def _plan_rl(recipe: Any, count: Count) -> list[StagePlan]:
    rl = recipe.rl
    pairs_plan, label_plan = StagePlan("rl", rl.pairs.policy_role), StagePlan("rl", rl.label.critic_role)
    if rl.pairs.source == "generate":
        prompts = _prompts(rl.pairs)
        for text in prompts:
            pairs_plan.add(rl.pairs.k, rl.pairs.k * count(text), rl.pairs.k * rl.pairs.max_tokens)
        pairs = len(prompts) * rl.pairs.max_pairs_per_prompt
        prompt_len, response_len = (sum(map(count, prompts)) // max(1, len(prompts)), rl.pairs.max_tokens)
    elif rl.pairs.source == "sl" and recipe.sl is not None:
        pairs = len(_prompts(recipe.sl))
        prompt_len, response_len = 40, recipe.sl.max_tokens
    else:
        pairs = len(_prompts(rl.pairs)) if rl.pairs.input else 0
        prompt_len, response_len = 40, 128
    judgments = pairs * rl.label.ensemble * (2 if rl.label.swap else 1)
    feedback = prompt_len + 2 * response_len + 60
    output = rl.label.cot.max_tokens if rl.label.cot.enabled else 1
    label_plan.add(judgments, judgments * feedback, judgments * output)
    label_plan.notes.append(f"{pairs} pairs × {rl.label.ensemble} principles × {2 if rl.label.swap else 1} orders")
    return [pairs_plan, label_plan]


def _plan_eval(recipe: Any, count: Count) -> list[StagePlan]:
    from cai_async.evaluation.suites import load_suite

    ev = recipe.eval
    plans = {m.group: StagePlan("eval", m.group) for m in ev.models}
    judge = StagePlan("eval", ev.judge_role, rounds=2 if "helpfulness" in ev.suites else 1)
    for suite in ev.suites:
        try:
            prompts = load_suite(suite, ev.data_dir, n=ev.n, seed=ev.seed)
        except CaiError:
            continue
        for model in ev.models:
            for p in prompts:
                plans[model.group].add(1, count(p.prompt), ev.max_tokens)
                if suite != "helpfulness":
                    judge.add(1 + ev.ensemble, (1 + ev.ensemble) * (count(p.prompt) + ev.max_tokens + 80),
                              1 + ev.ensemble)
        if suite == "helpfulness":
            pairs = len(prompts) * (len(ev.models) - 1)
            judge.add(2 * pairs, 2 * pairs * (2 * ev.max_tokens + 120), 2 * pairs)
    return [*plans.values(), judge]


_SUMMED = ("calls", "input_tokens", "output_tokens", "cost_usd", "cost_usd_online", "cost_usd_batch")


def _row(plan: StagePlan, endpoints: list[Any]) -> dict[str, Any]:
    """One stage's line: its work, its price in the endpoints' own mode and in each mode (split by endpoint
    weight), and the least time the online endpoints' rate limits allow."""
    weights = sum(e.weight for e in endpoints) or 1.0

    def priced(mode: Literal["online", "batch"] | None) -> float:
        cost: float = sum(e.weight / weights * e.cost(plan.input_tokens, plan.output_tokens, mode) for e in endpoints)
        return round(cost, 4)

    online = [e for e in endpoints if e.mode == "online"]
    rpm = sum(e.rpm for e in online if e.rpm) or None
    tpm = sum(e.tpm for e in online if e.tpm) or None
    minutes = max(plan.calls / rpm if rpm else 0.0, (plan.input_tokens + plan.output_tokens) / tpm if tpm else 0.0)
    batch = any(e.mode == "batch" for e in endpoints)
    notes = list(plan.notes)
    if batch:
        notes.append(f"batch mode: {plan.rounds} round(s) of batches, each done within "
                     f"{endpoints[0].batch.completion_window} (often minutes)")
    return {"stage": plan.stage, "group": plan.group, "calls": plan.calls, "input_tokens": plan.input_tokens,
            "output_tokens": plan.output_tokens, "cost_usd": priced(None), "cost_usd_online": priced("online"),
            "cost_usd_batch": priced("batch"), "mode": "batch" if batch else "online", "batch_rounds": plan.rounds,
            "min_minutes_by_rate_limits": round(minutes, 2) if minutes else None, "notes": notes}


def plan_recipe(recipe: Any) -> dict[str, Any]:
    """Estimated calls, tokens, dollars and rate-limited minutes per stage and group, and in total."""
    plans: list[StagePlan] = []
    count, method = _token_counter(recipe)
    if recipe.generate is not None:
        gen = StagePlan("generate", recipe.generate.role)
        for text in _prompts(recipe.generate):
            gen.add(1, count(text), recipe.generate.max_tokens)
        plans.append(gen)
    if recipe.sl is not None:
        plans += _plan_sl(recipe, count)
    if recipe.rl is not None:
        plans += _plan_rl(recipe, count)
    if recipe.eval is not None:
        plans += _plan_eval(recipe, count)
    rows: list[dict[str, Any]] = []
    total: dict[str, float] = dict.fromkeys(_SUMMED, 0)
    for plan in plans:
        if not plan.calls:
            continue
        try:
            endpoints = recipe.engine.group(plan.group)
        except CaiError:
            endpoints = []
        rows.append(_row(plan, endpoints))
        for key in _SUMMED:
            total[key] = round(total[key] + rows[-1][key], 4)
    return {"stages": rows, "total": total,
            "method": f"{method}; outputs at max_tokens (upper bound)"}
