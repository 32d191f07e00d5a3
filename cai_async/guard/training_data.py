"""What the guard classifier learns from: the data the stages already wrote into a run dir — red-team prompts
(SL-CAI chains) against benign ones (the helpfulness mix), initial (harmful) answers against their revisions,
labelled pairs with their AI-feedback confidence as soft targets, the judge's calls on live traffic the guard
audited — plus, optionally, bundled public prompts and requests generated per principle through the engine
(violating ones, and near-miss look-alikes that are fine). XSTest and AdvBench are never among the bundled
sources: the guard is measured on them."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio
import polars as pl

from backends.types import ChatRequest
from cai_async.judging import transcript
from cai_async.public_data import BUNDLED, HH_TURNS
from cai_async.store import read_shards

if TYPE_CHECKING:
    from cai_async.engine import Engine
    from cai_async.guard.verdicts import GuardPrinciple

__all__ = [
    "Example",
    "audit_examples",
    "exchange_text",
    "generated_examples",
    "public_examples",
    "run_dir_examples",
    "split_examples",
]


@dataclass(frozen=True, slots=True)
class Example:
    """One training text: a request alone (``input``) or a request with its answer (``output``), the target
    P(violation) in [0, 1] and where it came from."""

    text: str
    target: float
    source: str
    direction: Literal["input", "output"]


def exchange_text(messages: Sequence[dict[str, Any]], answer: str | None = None) -> str:
    """The text the classifier reads: the conversation as ``Human:``/``Assistant:`` paragraphs, then the answer
    when there is one (the same in training and at run time)."""
    turns = [{"role": str(m.get("role", "user")), "content": str(m.get("content") or "")} for m in messages]
    if answer is not None:
        turns.append({"role": "assistant", "content": answer})
    return transcript(turns)


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _messages(value: Any) -> list[dict[str, Any]]:
    return [dict(m) for m in value] if value is not None else []


def _last_assistant(value: Any) -> str:
    turns = _messages(value)
    return str(turns[-1]["content"] or "") if turns and turns[-1]["role"] == "assistant" else ""


def run_dir_examples(run_dir: str | Path) -> list[Example]:
    """Examples from a run dir: ``sl/`` chains (their prompts violating; initial answers violating, revisions
    fine), ``helpful/`` responses (prompts and answers fine), the guard's audited checks kept with their text
    (``guard/audits``: the judge's call is the target) and ``exports/dpo.parquet`` pairs (rejected answer: target =
    the label's confidence, chosen answer: 1 − confidence)."""
    root = Path(run_dir)
    out: list[Example] = []
    chains = read_shards(root / "sl")
    if not chains.is_empty():
        for row in chains.filter(pl.col("status") == "ok").iter_rows(named=True):
            messages = _messages(row["messages"])
            out.append(Example(exchange_text(messages), 1.0, "sl-prompt", "input"))
            if row["initial_response"]:
                out.append(Example(exchange_text(messages, row["initial_response"]), 1.0, "sl-initial", "output"))
            if row["final_response"] and row["final_response"].strip() != (row["initial_response"] or "").strip():
                out.append(Example(exchange_text(messages, row["final_response"]), 0.0, "sl-revision", "output"))
    helpful = read_shards(root / "helpful")
    if helpful.is_empty() and (root / "exports" / "sft.parquet").is_file():
        sft = pl.read_parquet(root / "exports" / "sft.parquet")
        if "source" in sft.columns:
            for row in sft.filter(pl.col("source") == "helpful").iter_rows(named=True):
                turns = _messages(row["messages"])
                out.append(Example(exchange_text(turns[:-1]), 0.0, "helpful-prompt", "input"))
                out.append(Example(exchange_text(turns[:-1], _last_assistant(turns)), 0.0, "helpful-answer",
                                   "output"))
    elif not helpful.is_empty():
        for row in helpful.iter_rows(named=True):
            messages = _messages(row.get("messages")) or _user(str(row.get("prompt") or ""))
            out.append(Example(exchange_text(messages), 0.0, "helpful-prompt", "input"))
            if row.get("response"):
                out.append(Example(exchange_text(messages, row["response"]), 0.0, "helpful-answer", "output"))
    out += audit_examples(root)
    dpo = root / "exports" / "dpo.parquet"
    if dpo.is_file():
        for row in pl.read_parquet(dpo).iter_rows(named=True):
            prompt, confidence = _messages(row["prompt"]), float(row["confidence"])
            out.append(Example(exchange_text(prompt, _last_assistant(row["rejected"])), confidence, "pair-rejected",
                               "output"))
            out.append(Example(exchange_text(prompt, _last_assistant(row["chosen"])), 1.0 - confidence,
                               "pair-chosen", "output"))
    return out


def audit_examples(run_dir: str | Path) -> list[Example]:
    """The checks a guard serving ``run_dir`` audited with ``guard.classifier.keep_text``: their text, the
    judge's call as the target (1: it found a violation)."""
    rows = read_shards(Path(run_dir) / "guard" / "audits")
    return [Example(row["text"], 1.0 if row["violated"] else 0.0, "guard-audit", row["direction"])
            for row in rows.iter_rows(named=True)]


def public_examples() -> list[Example]:
    """Bundled public prompts: hh-rlhf harmless-base red-team first turns (violating) and the self-instruct
    seed tasks (fine)."""
    red = [json.loads(line)["prompt"] for line in (BUNDLED / HH_TURNS).read_text(encoding="utf-8").splitlines()]
    tasks = [json.loads(line)["instruction"] for line in
             (BUNDLED / "self_instruct" / "seed_tasks.jsonl").read_text(encoding="utf-8").splitlines()]
    return ([Example(exchange_text(_user(t)), 1.0, "public-redteam", "input") for t in red]
            + [Example(exchange_text(_user(t)), 0.0, "public-benign", "input") for t in tasks])


_NUMBERING = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s*")

_VIOLATING = (
    "Write {n} different requests that a user might send to an AI assistant, where doing what the request asks "
    "would go against this principle:\n\n{question}\n\nWrite one request per line, with no numbering and nothing "
    "else."
)
_NEAR_MISS = (
    "Write {n} different requests that a user might send to an AI assistant that look like requests going "
    "against this principle (the same topics and words) but are harmless and fine to help with:\n\n{question}\n\n"
    "Write one request per line, with no numbering and nothing else."
)


def _lines(text: str, count: int) -> list[str]:
    found = [_NUMBERING.sub("", line).strip().strip('"') for line in text.splitlines()]
    return [line for line in found if len(line) >= 8][:count]


async def generated_examples(engine: Engine, role: str, principles: Sequence[GuardPrinciple], count: int, *,
                             seed: int = 0) -> list[Example]:
    """Per principle, ``count`` requests that violate it (target 1) and ``count`` near-miss look-alikes that
    are fine (target 0), asked of ``role`` through the engine (cached, so a rerun asks nothing again)."""
    out: list[Example] = []

    async def ask(principle: GuardPrinciple, template: str, target: float, source: str) -> None:
        prompt = template.format(n=count, question=principle.question)
        answer = await engine.chat(role, ChatRequest(_user(prompt), max_tokens=48 * count + 32, temperature=0.7,
                                                     seed=seed))
        out.extend(Example(exchange_text(_user(line)), target, f"{source}:{principle.name}", "input")
                   for line in _lines(answer.text, count))

    async with anyio.create_task_group() as tg:
        for principle in principles:
            tg.start_soon(ask, principle, _VIOLATING, 1.0, "generated-violating")
            tg.start_soon(ask, principle, _NEAR_MISS, 0.0, "generated-near-miss")
    return sorted(out, key=lambda e: (e.source, e.text))


def split_examples(examples: Sequence[Example], held_out: float, *, seed: int = 0) -> tuple[list[Example],
                                                                                           list[Example]]:
    """Duplicates dropped (the first kept), then ``(train, held out)`` by a hash of each text, so a text never
    sits on both sides and a rerun splits the same way."""
    seen: set[str] = set()
    train: list[Example] = []
    test: list[Example] = []
    for example in examples:
        if example.text in seen:
            continue
        seen.add(example.text)
        digest = hashlib.sha256(f"{seed}\x1f{example.text}".encode()).digest()
        (test if int.from_bytes(digest[:4], "big") / 2**32 < held_out else train).append(example)
    return train, test
