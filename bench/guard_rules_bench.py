"""What reading the whole exchange and undoing disguises costs the rules tier, per check, in this process: a 4 KB
chat request (system prompt, a few turns, a tool call, a base64 blob) read into its parts, normalised (NFKC,
zero-width and bidi characters, homoglyphs, leetspeak, split words), its encoded spans decoded, and matched against
the principles' rules — against the baseline of what the guard did before: one regex search per rule over the last
message's text. Target: ≤ 1 ms p50 added (the guard proxy adds the same CPU time to a request at 1 client).

    .venv/bin/python bench/guard_rules_bench.py [--checks 2000]"""

from __future__ import annotations

import argparse
import asyncio
import base64
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cai_async.engine import Engine, EngineConfig  # noqa: E402
from cai_async.guard import Guard, GuardConfig  # noqa: E402

WORDS = ["make a bomb", "napalm", "nerve agent", "credit card dump", "ransomware payload", "child abuse",
         "synthesize meth", "pipe bomb", "ricin", "zero-day exploit"]
PATTERNS = [r"how (do|can) i (kill|poison)\b", r"\bbuy (a )?gun\b without", r"\bdox(x)?ing\b", r"steal .* identity",
            r"\bcredit card numbers?\b", r"bypass .* (paywall|license)", r"\bswat(ting)?\b", r"launder(ing)? money",
            r"\bbomb threat\b", r"\bhack (into|someone)"]


def request_4kb() -> list[dict[str, object]]:
    """A realistic 4 KB conversation that no rule matches."""
    prose = ("The quarterly report covers revenue, hiring and the roadmap for the next two releases. Please keep "
             "the tone neutral and cite the figures from the attached table where they help the reader. ")
    blob = base64.b64encode(b"PNG header and some harmless bytes of an attachment" * 2).decode()
    messages: list[dict[str, object]] = [
        {"role": "system", "content": "You are a careful assistant for a finance team. " + prose},
        {"role": "user", "content": prose * 6 + f" Attachment: {blob}"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "lookup", "arguments": '{"table": "q3", "columns": ["revenue", "hires"]}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "revenue: 4.2M; hires: 12"},
        {"role": "user", "content": prose * 13 + " Summarise it in five bullet points."},
    ]
    return messages


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def rules_cost(checks: int = 2000) -> None:
    """Print the rules tier's cost per check against the old last-message regex (both alternated in one loop)."""
    messages = request_4kb()
    size = sum(len(str(m.get("content") or "")) for m in messages)
    with tempfile.TemporaryDirectory() as tmp:
        principles = Path(tmp) / "principles.yaml"
        principles.write_text("name: bench\nprinciples:\n  - name: rules\n    question: Is it harmful?\n    rules:\n"
                              f"      words: {WORDS}\n      patterns: {[p for p in PATTERNS]!r}\n", encoding="utf-8")
        engine_config = EngineConfig.model_validate({"groups": {"critic": [
            {"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1"}]}, "progress": "off"})
        async with Engine(engine_config, run_dir=tmp) as engine:
            guard = Guard(engine, GuardConfig(principles=str(principles)))
            compiled = [re.compile(p, re.IGNORECASE) for p in PATTERNS]
            words = [re.compile(rf"\b{re.escape(w)}\b") for w in WORDS]
            last = str(messages[-1]["content"])
            rounds: dict[str, list[float]] = {"before: last message, plain regex": [], "now: whole exchange": []}
            for _ in range(checks):  # alternated, so both see the same machine
                start = time.perf_counter()
                lowered = last.lower()
                hit = any(c.search(last) for c in compiled) or any(w.search(lowered) for w in words)
                rounds["before: last message, plain regex"].append(time.perf_counter() - start)
                assert not hit
                start = time.perf_counter()
                parts = guard.read_request(messages)
                verdict = guard._rules("input", parts, limit=1 << 20)
                rounds["now: whole exchange"].append(time.perf_counter() - start)
                assert verdict is None
    print(f"rules tier per check on a {size / 1024:.1f} KB request, {len(WORDS)} words + {len(PATTERNS)} patterns, "
          f"{checks} checks")
    for name, times in rounds.items():
        print(f"  {name:<36} p50 {p(times, .5) * 1e6:8.1f} µs   p99 {p(times, .99) * 1e6:8.1f} µs   "
              f"mean {statistics.fmean(times) * 1e6:8.1f} µs")
    before, now = (p(t, .5) for t in rounds.values())
    print(f"  added p50 {(now - before) * 1e3:.3f} ms per check (target ≤ 1 ms); ratio {now / before:.1f}×")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checks", type=int, default=2000)
    await rules_cost(parser.parse_args().checks)


if __name__ == "__main__":
    asyncio.run(main())
