"""``cai plan``: before spending, estimate a recipe's calls, input/output tokens, dollars and the wall time its
endpoints' rate limits allow. Prompt tokens are counted with the model's own tokenizer where one is at hand (a
local GGUF's), otherwise approximated (4 characters a token; a hosted model's tokenizer cannot be fetched
offline); outputs are counted at their ``max_tokens`` cap, so the dollar figure leans high. The run's summary
sets the estimate beside what was actually spent. Each stage estimates its own work (``StageUnit.plan``); this
module counts tokens, prices the estimates per endpoint group and sums them."""

from __future__ import annotations

from typing import Any, Literal

from backends.errors import CaiError
from cai_async.stages.unit import Count, StagePlan, stage_units

__all__ = ["StagePlan", "plan_recipe", "token_counter"]

_PER_MESSAGE = 4


def _approximate(text: str) -> int:
    return len(text) // 4 + _PER_MESSAGE


def token_counter(recipe: Any) -> tuple[Count, str]:
    """The tokenizer of the first group served wholly by one local GGUF model, else the approximation."""
    for endpoints in recipe.engine.groups.values():
        models = {e.model for e in endpoints if e.backend == "llamacpp"}
        if len(models) != 1 or len(models) != len({e.model for e in endpoints}):
            continue
        try:
            from llama_cpp import Llama

            from backends.gguf_copy import quiet_stderr
            from backends.llamacpp import check_gguf, embedded_model_path

            model = models.pop()
            path = embedded_model_path() if model in ("", "embedded") else check_gguf(model)
            with quiet_stderr():  # llama.cpp notes a context-size warning even with verbose=False
                vocab = Llama(model_path=str(path), vocab_only=True, verbose=False, n_ctx=64)
        except (ImportError, CaiError, ValueError):
            continue

        def count(text: str, vocab: Any = vocab) -> int:
            return len(vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)) + _PER_MESSAGE

        return count, f"prompt tokens counted with the tokenizer of {path.name}"
    return _approximate, "approximate prompt tokens: 4 characters a token + 4 a message"


SUMMED = ("calls", "input_tokens", "output_tokens", "cost_usd", "cost_usd_online", "cost_usd_batch")


def plan_row(plan: StagePlan, endpoints: list[Any]) -> dict[str, Any]:
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


def plan_recipe(recipe: Any, *, counter: tuple[Count, str] | None = None) -> dict[str, Any]:
    """Estimated calls, tokens, dollars and rate-limited minutes per stage and group, and in total; ``counter``:
    the recipe's :func:`token_counter` when the caller has it (a GGUF vocabulary loads once)."""
    count, method = counter or token_counter(recipe)
    plans = [plan for unit in stage_units() if unit.config(recipe) is not None for plan in unit.plan(recipe, count)]
    rows: list[dict[str, Any]] = []
    total: dict[str, float] = dict.fromkeys(SUMMED, 0)
    for plan in plans:
        if not plan.calls:
            continue
        try:
            endpoints = recipe.engine.group(plan.group)
        except CaiError:
            endpoints = []
        rows.append(plan_row(plan, endpoints))
        for key in SUMMED:
            total[key] = round(total[key] + rows[-1][key], 4)
    return {"stages": rows, "total": total,
            "method": f"{method}; outputs at max_tokens (upper bound)"}
