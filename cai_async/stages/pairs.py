"""Response pairs for RL-CAI: K sampled responses per prompt from the ``policy`` group, the (initial,
revised) responses of an SL-CAI run, or two response columns of a file. Identical responses are dropped
and counted."""

from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import Field

from backends.errors import BudgetExceeded, CaiError, ConfigError
from backends.types import ChatRequest
from cai_async.engine import Engine
from cai_async.prompts import PromptRow, PromptSource
from cai_async.stages.common import StageReport, compact, gather_calls
from cai_async.stages.unit import ItemExecutor
from cai_async.store import MESSAGES, ShardWriter, read_shards

__all__ = [
    "PAIR_SCHEMA", "PairRow", "PairsConfig", "PairsReport", "load_pairs", "pair_id", "run_pairs", "sample_responses",
]

PAIR_SCHEMA: dict[str, pl.DataType] = {
    "id": pl.String(),
    "prompt_id": pl.String(),
    "source": pl.String(),
    "prompt": pl.String(),
    "messages": MESSAGES,
    "response_a": pl.String(),
    "response_b": pl.String(),
    "detail": pl.String(),
}
"""One row per pair; ``detail`` says where each response came from (seed, temperature, SL round)."""


@dataclass(frozen=True, slots=True)
class PairRow:
    """Two responses to one conversation."""

    id: str
    prompt_id: str
    messages: tuple[dict[str, str], ...]
    response_a: str
    response_b: str
    source: str = "file"
    detail: str = ""
    human_preferred: str | None = None
    """``"A"`` or ``"B"`` where a human label is known (label-quality checks)."""

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]


def pair_id(prompt_id: str, a: str, b: str) -> str:
    """Stable id of a pair: the prompt and both responses."""
    return hashlib.sha1(f"{prompt_id}\x1f{a}\x1f{b}".encode()).hexdigest()[:16]


class PairsConfig(PromptSource):
    """Where pairs come from (recipe key ``label.pairs``): ``input`` holds prompts (``generate``) or two response
    columns (``columns``)."""

    source: Literal["generate", "sl", "columns"] = "generate"
    sl_run: str | None = None
    """``sl``: the run directory whose chains give (initial, revised); default: this run."""
    response_a_column: str = "response_a"
    response_b_column: str = "response_b"
    k: int = Field(default=2, ge=2, le=16)
    """``generate``: responses sampled per prompt."""
    temperatures: list[float] = Field(default_factory=lambda: [0.7, 1.0], min_length=1)
    """Cycled over the k samples (each sample also gets its own seed)."""
    max_tokens: int = Field(default=128, ge=1)
    seed: int = 0
    max_pairs_per_prompt: int = Field(default=1, ge=1)
    policy_role: str = "policy"
    shard_rows: int = Field(default=64, ge=1)
    flush_every_s: float = Field(default=10.0, gt=0)


@dataclass
class PairsReport(StageReport):
    """What a pairs run did: ``total`` prompts, ``written`` pairs, duplicates dropped, and the pairs selected."""

    identical_dropped: int = 0
    rows: list[PairRow] = field(default_factory=list)
    """Every pair of the selected prompts, made by this run or an earlier one."""


def _distinct_pairs(
    prompt_id: str, messages: tuple[dict[str, str], ...], responses: list[tuple[str, str]], source: str, limit: int
) -> tuple[list[PairRow], int]:
    """Pairs of distinct responses (at most ``limit``) and how many responses were dropped as duplicates."""
    seen: dict[str, tuple[str, str]] = {}
    for text, detail in responses:
        seen.setdefault(text.strip(), (text.strip(), detail))
    distinct = [v for v in seen.values() if v[0]]
    dropped = len(responses) - len(distinct)
    rows = [
        PairRow(pair_id(prompt_id, a, b), prompt_id, messages, a, b, source, f"A: {da}; B: {db}")
        for (a, da), (b, db) in itertools.islice(itertools.combinations(distinct, 2), limit)
    ]
    return rows, dropped


def _record(row: PairRow) -> dict[str, Any]:
    return {"id": row.id, "prompt_id": row.prompt_id, "source": row.source, "prompt": row.prompt,
            "messages": list(row.messages), "response_a": row.response_a, "response_b": row.response_b,
            "detail": row.detail}


def _static_pairs(config: PairsConfig, run_dir: Path) -> tuple[list[PairRow], int, int]:
    """Pairs that need no calls (``sl`` and ``columns``), the prompts seen, and duplicates dropped."""
    pairs: list[PairRow] = []
    dropped = 0
    if config.source == "sl":
        folder = Path(config.sl_run or run_dir) / "sl"
        chains = read_shards(folder)
        if chains.is_empty():
            raise ConfigError(f"{folder}: no SL-CAI chains to take pairs from; run the sl stage first")
        chains = chains.filter(pl.col("status") == "ok")
        for chain in chains.head(config.limit or chains.height).iter_rows(named=True):
            rows, lost = _distinct_pairs(
                chain["id"], tuple(chain["messages"]),
                [(chain["initial_response"], "initial"), (chain["final_response"], f"revised x{chain['num_rounds']}")],
                "sl", 1,
            )
            pairs += rows
            dropped += lost
        return pairs, chains.height, dropped
    columns = (config.response_a_column, config.response_b_column)
    prompts = config.load(extra_columns=columns)
    for prompt in prompts:
        values = dict(prompt.extra)
        rows, lost = _distinct_pairs(
            prompt.id, prompt.messages, [(str(values[c] or ""), c) for c in columns], "columns", 1
        )
        pairs += rows
        dropped += lost
    return pairs, len(prompts), dropped


async def sample_responses(engine: Engine, config: PairsConfig, row: PromptRow) -> list[tuple[str, str]]:
    """``config.k`` sampled responses to ``row`` with where each came from (``generate`` pairs); the first
    failure is raised."""
    together = engine.item_concurrency(config.policy_role) > 1

    async def one(i: int) -> tuple[str, str]:
        temperature = config.temperatures[i % len(config.temperatures)]
        request = ChatRequest(row.conversation(), max_tokens=config.max_tokens, temperature=temperature,
                              seed=config.seed + i)
        result = await engine.chat(config.policy_role, request)
        return result.text, f"seed {config.seed + i}, temperature {temperature:g}"

    outcomes = await gather_calls([partial(one, i) for i in range(config.k)], together=together)
    for outcome in outcomes:
        if isinstance(outcome, CaiError):
            raise outcome
    return [o for o in outcomes if not isinstance(o, CaiError)]


async def run_pairs(engine: Engine, config: PairsConfig, out_dir: str | Path, *, run_dir: str | Path,
                    executor: ItemExecutor | None = None) -> PairsReport:
    """Write pairs into ``out_dir`` (Parquet shards), skipping prompts already done; sampled pairs are sampled
    on ``executor`` (default the engine)."""
    writer = ShardWriter(out_dir, shard_rows=config.shard_rows, schema=PAIR_SCHEMA, flush_every_s=config.flush_every_s)
    done = writer.existing_ids("prompt_id")
    report = PairsReport()
    start = time.perf_counter()
    selected: set[str] = set()
    try:
        if config.source != "generate":
            pairs, report.total, report.identical_dropped = _static_pairs(config, Path(run_dir))
            selected = {p.prompt_id for p in pairs}
            fresh = [p for p in pairs if p.prompt_id not in done]
            report.skipped = len(selected) - len({p.prompt_id for p in fresh})
            writer.extend(_record(p) for p in fresh)
        else:
            await _generate_pairs(engine, config, writer, report, done, selected, executor)
    except BudgetExceeded as exc:
        report.stopped = str(exc)
    finally:
        writer.flush()
        report.written = writer.written
        report.seconds = time.perf_counter() - start
    await compact(writer)
    report.rows = [p for p in load_pairs(out_dir) if p.prompt_id in selected]
    return report


async def _generate_pairs(engine: Engine, config: PairsConfig, writer: ShardWriter, report: PairsReport,
                          done: set[str], selected: set[str], executor: ItemExecutor | None) -> None:
    """Sample ``k`` responses per prompt through the policy group and write their distinct pairs."""
    prompts = config.load()
    selected.update(p.id for p in prompts)
    todo = [p for p in prompts if p.id not in done]
    report.total, report.skipped = len(prompts), len(prompts) - len(todo)

    sample = partial(sample_responses, engine, config)  # a partial of a module function: it travels to Ray actors

    def on_result(row: PromptRow, outcome: list[tuple[str, str]] | CaiError) -> None:
        if isinstance(outcome, CaiError):
            report.failed += 1
            report.failures.append({"id": row.id, "error": f"{type(outcome).__name__}: {outcome}"})
            return
        rows, lost = _distinct_pairs(row.id, row.messages, outcome, "generate", config.max_pairs_per_prompt)
        report.identical_dropped += lost
        writer.extend(_record(p) for p in rows)

    runner: ItemExecutor = engine if executor is None else executor
    batch = await runner.run_batch(todo, sample, on_result=on_result, total=len(todo),
                                   concurrency=engine.item_concurrency(config.policy_role))
    report.stopped = batch.stopped


def load_pairs(directory: str | Path) -> list[PairRow]:
    """The pairs written by :func:`run_pairs`."""
    frame = read_shards(directory)
    return [
        PairRow(r["id"], r["prompt_id"], tuple(r["messages"]), r["response_a"], r["response_b"], r["source"],
                r["detail"] or "")
        for r in frame.iter_rows(named=True)
    ] if not frame.is_empty() else []
