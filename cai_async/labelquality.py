"""How good are the AI-feedback labels? Label human-preference pairs (hh-rlhf harmless-base: human chosen vs
rejected) and report accuracy against the human label, position consistency, abstentions and calibration
(expected calibration error and a reliability diagram), per principle and overall, with and without the
position swap and the ensemble."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

import polars as pl

from backends.errors import ConfigError
from cai_async.engine import Engine
from cai_async.judging import wilson_interval
from cai_async.prompts import parse_conversation
from cai_async.stages.label import LabelConfig, run_label
from cai_async.stages.pairs import PairRow, pair_id
from cai_async.store import read_shards, write_json

__all__ = ["expected_calibration_error", "human_pairs", "quality_metrics", "run_label_quality"]


def human_pairs(path: str | Path, *, limit: int | None = None, seed: int = 0) -> list[PairRow]:
    """Pairs from an hh-rlhf style file (``chosen``/``rejected`` transcripts that share all but the last
    assistant turn). Which response is (A) is decided by a seeded hash, so the human label is balanced."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: no such file (expected hh-rlhf JSONL with chosen/rejected transcripts)")
    opener = gzip.open if file.name.endswith(".gz") else open
    pairs: list[PairRow] = []
    with opener(file, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            if limit is not None and len(pairs) >= limit:
                break
            try:
                record = json.loads(line)
                chosen, rejected = parse_conversation(record["chosen"]), parse_conversation(record["rejected"])
            except (json.JSONDecodeError, KeyError, ValueError) as exc:
                raise ConfigError(f"{file}: line {number + 1}: not a chosen/rejected record ({exc})") from None
            if not chosen or not rejected or chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant":
                continue
            good, bad = chosen[-1]["content"], rejected[-1]["content"]
            if not good.strip() or not bad.strip() or good.strip() == bad.strip():
                continue
            context = tuple(chosen[:-1])
            prompt_key = hashlib.sha1(json.dumps(context).encode()).hexdigest()[:16]
            a_is_human = int(hashlib.sha1(f"{seed}:{prompt_key}".encode()).hexdigest(), 16) % 2 == 0
            a, b = (good, bad) if a_is_human else (bad, good)
            pairs.append(PairRow(pair_id(prompt_key, a, b), prompt_key, context, a, b, "human",
                                 "hh-rlhf chosen vs rejected", human_preferred="A" if a_is_human else "B"))
    if not pairs:
        raise ConfigError(f"{file}: no usable chosen/rejected pairs")
    return pairs


def expected_calibration_error(
    probs: list[float], outcomes: list[bool], bins: int = 10
) -> tuple[float, list[dict[str, float]]]:
    """ECE of P(A better) against whether A was better, and the reliability-diagram bins."""
    table = []
    total = len(probs)
    ece = 0.0
    for index in range(bins):
        low, high = index / bins, (index + 1) / bins
        members = [(p, o) for p, o in zip(probs, outcomes, strict=True)
                   if low <= p < high or (index == bins - 1 and p == 1.0)]
        if not members:
            continue
        mean_p = sum(p for p, _ in members) / len(members)
        freq = sum(o for _, o in members) / len(members)
        ece += len(members) / total * abs(mean_p - freq)
        table.append({"low": low, "high": high, "count": len(members), "mean_p": mean_p, "observed": freq})
    return ece, table


def _variant(name: str, probs: list[float | None], human_a: list[bool]) -> dict[str, Any]:
    answered = [(p, h) for p, h in zip(probs, human_a, strict=True) if p is not None]
    decided = [(p, h) for p, h in answered if p != 0.5]
    correct = sum((p > 0.5) == h for p, h in decided)
    low, high = wilson_interval(correct, len(decided))
    ece, bins = expected_calibration_error([p for p, _ in answered], [h for _, h in answered]) if answered else (
        float("nan"), [])
    return {
        "variant": name, "pairs": len(probs), "answered": len(answered), "abstained": len(probs) - len(answered),
        "abstention_rate": (len(probs) - len(answered)) / len(probs) if probs else 0.0,
        "undecided": len(answered) - len(decided),
        "accuracy": correct / len(decided) if decided else float("nan"), "accuracy_ci95": [low, high],
        "ece": ece, "bins": bins, "chance_level": low <= 0.5 <= high,
    }


def _judgment_p(row: dict[str, Any], principle: str | None, order: str | None) -> float | None:
    values = [j["p_a"] for j in row["judgments"] or []
              if (principle is None or j["principle"] == principle) and (order is None or j["order"] == order)
              and j["p_a"] is not None]
    return sum(values) / len(values) if values else None


def quality_metrics(labels: pl.DataFrame) -> dict[str, Any]:
    """Accuracy vs the human label, consistency, abstentions and calibration: overall (four variants) and per
    principle."""
    rows = [r for r in labels.iter_rows(named=True) if r["status"] == "ok" and r["human_preferred"]]
    if not rows:
        raise ConfigError("no labelled human-preference pairs to score")
    human_a = [r["human_preferred"] == "A" for r in rows]
    first = [(r["principles"] or [{}])[0].get("name") for r in rows]
    variants = [
        _variant("swap + ensemble", [r["p_a"] for r in rows], human_a),
        _variant("swap, one principle", [_judgment_p(r, f, None) for r, f in zip(rows, first, strict=True)],
                 human_a),
        _variant("no swap + ensemble", [_judgment_p(r, None, "AB") for r in rows], human_a),
        _variant("no swap, one principle", [_judgment_p(r, f, "AB") for r, f in zip(rows, first, strict=True)],
                 human_a),
    ]
    consistency = [r["consistency"] for r in rows if r["consistency"] is not None]
    names = sorted({p["name"] for r in rows for p in r["principles"] or []})
    per_principle = []
    for name in names:
        subset = [(r, h) for r, h in zip(rows, human_a, strict=True)
                  if any(p["name"] == name for p in r["principles"] or [])]
        stats = _variant(name, [_judgment_p(r, name, None) for r, _ in subset], [h for _, h in subset])
        flags = [p["consistent"] for r, _ in subset for p in r["principles"] if p["name"] == name
                 and p["consistent"] is not None]
        stats["position_consistency"] = sum(flags) / len(flags) if flags else None
        per_principle.append(stats)
    methods = sorted({m for r in rows for m in (r["methods"] or "").split(",") if m})
    return {
        "pairs": len(rows), "methods": methods,
        "position_consistency": sum(consistency) / len(consistency) if consistency else None,
        "variants": variants, "per_principle": per_principle,
    }


def _reliability_png(variants: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for variant in variants[:3:2]:
        bins = variant["bins"]
        ax.plot([b["mean_p"] for b in bins], [b["observed"] for b in bins], marker="o",
                label=f"{variant['variant']} (ECE {variant['ece']:.3f})")
    ax.set_xlabel("labeller's P(A is better)")
    ax.set_ylabel("share where humans preferred A")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Reliability of AI-feedback labels")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _markdown(metrics: dict[str, Any], model: str) -> str:
    lines = [f"# Label quality: {model}", "",
             f"{metrics['pairs']} human-labelled pairs; scoring method(s): {', '.join(metrics['methods'])}.", "",
             "| variant | accuracy | 95% CI | abstained | ECE |", "|---|---|---|---|---|"]
    for v in metrics["variants"]:
        low, high = v["accuracy_ci95"]
        lines.append(f"| {v['variant']} | {v['accuracy']:.3f} | {low:.3f}–{high:.3f} | {v['abstention_rate']:.1%} "
                     f"| {v['ece']:.3f} |")
    main = metrics["variants"][0]
    if main["chance_level"]:
        lines += ["", f"**The labels are indistinguishable from chance**: 50% lies inside the 95% interval of the "
                      f"accuracy ({main['accuracy']:.1%}). Expected from a very small model; use a stronger judge "
                      "before training on these labels."]
    else:
        lines += ["", f"Accuracy {main['accuracy']:.1%} is above chance (the 95% interval excludes 50%)."]
    if metrics["position_consistency"] is not None:
        lines += ["", f"Position consistency (the preferred response survives the swap): "
                      f"{metrics['position_consistency']:.1%}."]
    lines += ["", "| principle | pairs | accuracy | consistency |", "|---|---|---|---|"]
    for p in metrics["per_principle"]:
        consistency = "–" if p["position_consistency"] is None else f"{p['position_consistency']:.1%}"
        lines.append(f"| {p['variant']} | {p['pairs']} | {p['accuracy']:.3f} | {consistency} |")
    return "\n".join(lines) + "\n"


async def run_label_quality(
    engine: Engine, config: LabelConfig, source: str | Path, out_dir: str | Path, *, limit: int = 200, seed: int = 0
) -> dict[str, Any]:
    """Label ``limit`` human-preference pairs from ``source`` and write ``report.json``, ``report.md`` and
    ``reliability.png`` into ``out_dir``; return the metrics."""
    out = Path(out_dir)
    pairs = human_pairs(source, limit=limit, seed=seed)
    report = await run_label(engine, config, pairs, out / "labels", run_id=out.name)
    labels = read_shards(out / "labels")
    wanted = {p.id for p in pairs}
    labels = labels.filter(pl.col("id").is_in(wanted)) if not labels.is_empty() else labels
    metrics = quality_metrics(labels)
    models = sorted({j["model"] for r in labels.iter_rows(named=True) for j in r["judgments"] or [] if j["model"]})
    metrics["critic_models"] = models
    metrics["run"] = {"labelled": report.labelled, "abstained": report.abstained, "errors": report.errors,
                      "failed": report.failed, "seconds": round(report.seconds, 2)}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", metrics, default=float)
    (out / "report.md").write_text(_markdown(metrics, ", ".join(models) or "critic"), encoding="utf-8")
    _reliability_png(metrics["variants"], out / "reliability.png")
    metrics["files"] = {name: str(out / name) for name in ("report.json", "report.md", "reliability.png")}
    return metrics
