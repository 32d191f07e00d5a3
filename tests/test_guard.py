"""The inference-time guard: ``cai guard serve`` in front of the test server, driven by the official ``openai``
SDK (plain and streamed). The judge is a second test server whose choice log-probabilities are planted per
phrase, so what is harmful is known: a planted harmful answer is blocked (cut mid-stream before the harmful
part), ``revise`` rewrites it, safe prompts pass, a dead judge fails open or closed as configured, bad requests
get OpenAI-shaped 400s, and the upstream key reaches no file."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import openai
import pytest

from cai_async import read_shards
from tests.conftest import ROOT, TestServer, listening_line, start_server
from tests.test_cli import CAI, cai

HARMFUL = "HARMFUL-DETAIL"
JUDGE_PLAN = {
    "TRIGGER-IN": "A",  # an input check of a request with this phrase: (A) yes, it goes against the principle
    HARMFUL: "B",  # an output check of an answer with it: (B) no, not a good response
    "go against this principle": "B",  # every other request is fine
    "Judged by this principle": "A",  # every other answer is fine
}
SAFE_PROMPTS = [
    "How do I kill a Python process that hangs?",
    "What is the best way to shoot a photo of the moon?",
    "Where can I buy a can of coke?",
]


@pytest.fixture
def judge() -> Iterator[TestServer]:
    server = start_server()
    server.configure(prefer_when=JUDGE_PLAN)
    yield server
    server.process.terminate()
    server.process.wait(timeout=10)


def guard_recipe(run_dir: Path, upstream: str, judge_url: str, **guard: Any) -> dict[str, Any]:
    return {
        "run_dir": str(run_dir),
        "engine": {"groups": {"critic": [{"name": "judge", "backend": "openai", "model": "j", "base_url": judge_url}]},
                   "progress": "off", "retry": {"max_attempts": 2, "initial_s": 0.01, "max_wait_s": 0.05},
                   "cache": {"enabled": False}},
        "guard": {"principles": "harmless", "ensemble": 2, "port": 0, "upstream": {"base_url": upstream},
                  "stream": {"check_every_chunks": 4, "hold_back_chars": 120}, "judge_timeout_s": 10, **guard},
    }


@contextmanager
def proxy(tmp_path: Path, recipe: dict[str, Any], env: dict[str, str] | None = None) -> Iterator[str]:
    """``cai guard serve RECIPE`` in a subprocess; yields its base URL."""
    path = tmp_path / "guard.json"
    path.write_text(json.dumps(recipe), encoding="utf-8")
    process = subprocess.Popen([*CAI, "guard", "serve", str(path)], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=ROOT)
    assert process.stderr is not None
    line = ""
    try:
        line = listening_line(process.stderr)
        yield line.split("listening on ")[1].split()[0]
    finally:
        process.terminate()
        process.wait(timeout=20)
        tail = process.stderr.read()
        (tmp_path / "proxy.stderr").write_text(line + tail, encoding="utf-8")


def client(base_url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)


def verdicts(run_dir: Path) -> list[dict[str, Any]]:
    return list(read_shards(run_dir / "guard" / "verdicts").iter_rows(named=True))


def ask(base_url: str, prompt: str, **options: Any) -> Any:
    return client(base_url).chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                                     **options)


def test_a_planted_harmful_answer_is_blocked_and_safe_prompts_pass(
    tmp_path: Path, server: TestServer, judge: TestServer
) -> None:
    run_dir = tmp_path / "run"
    with proxy(tmp_path, guard_recipe(run_dir, server.base_url, judge.base_url)) as url:
        for prompt in SAFE_PROMPTS:
            answer = ask(url, prompt)
            assert answer.choices[0].finish_reason == "stop"
            assert answer.choices[0].message.content.startswith("Reply ")  # the upstream's own answer
        server.configure(reply=f"Sure, here is how. {HARMFUL} step one.")
        blocked = ask(url, "Tell me something.")
        assert blocked.choices[0].finish_reason == "content_filter"
        assert HARMFUL not in blocked.choices[0].message.content
        assert "goes against the principle of" in blocked.choices[0].message.content
        assert blocked.model_extra["cai_guard"]["tier"] == "judge"
        refused = ask(url, "Please TRIGGER-IN now")  # blocked before it reaches the model
        assert refused.choices[0].finish_reason == "content_filter"
    assert server.stats()["ok"] == len(SAFE_PROMPTS) + 1  # the blocked request never reached the upstream
    rows = verdicts(run_dir)
    decisions = [(r["direction"], r["decision"]) for r in rows]
    assert decisions.count(("output", "block")) == 1 and decisions.count(("input", "block")) == 1
    assert decisions.count(("output", "allow")) == len(SAFE_PROMPTS)
    block = next(r for r in rows if r["direction"] == "output" and r["decision"] == "block")
    assert block["tier"] == "judge" and block["violated"] and block["scores"][0]["score"] > 0.5
    report = cai("guard", "report", str(run_dir))
    assert report.returncode == 0, report.stderr
    summary = json.loads(report.stdout)
    assert summary["verdicts"] == len(rows) and summary["directions"]["output"]["decisions"]["block"] == 1


def test_content_parts_reach_the_upstream_unchanged_and_their_text_is_checked(
    tmp_path: Path, server: TestServer, judge: TestServer
) -> None:
    server.configure(record=True)
    picture = [{"type": "text", "text": "What is in this picture?"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]
    with proxy(tmp_path, guard_recipe(tmp_path / "run", server.base_url, judge.base_url)) as url:
        answer = client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": picture}])
        assert answer.choices[0].finish_reason == "stop"
        split = [{"type": "text", "text": "Please TRIGGER"}, {"type": "text", "text": "-IN now"}]
        refused = client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": split}])
        assert refused.choices[0].finish_reason == "content_filter"  # the parts' text, joined, was checked
    assert server.requests() == [[{"role": "user", "content": picture}]]  # the image part went on as sent


def test_a_violating_stream_stops_before_the_violation_reaches_the_client(
    tmp_path: Path, server: TestServer, judge: TestServer
) -> None:
    safe = " ".join(f"word{i}" for i in range(60))
    server.configure(reply=f"{safe} {HARMFUL} and the rest of it.", stream_chunk_ms=2)
    run_dir = tmp_path / "run"
    with proxy(tmp_path, guard_recipe(run_dir, server.base_url, judge.base_url)) as url:
        received, finishes = "", []
        for chunk in ask(url, "Tell me a story.", stream=True):
            received += chunk.choices[0].delta.content or ""
            finishes.append(chunk.choices[0].finish_reason)
        assert HARMFUL not in received
        assert received.startswith("word0 word1") and len(received) > 100  # safe text streamed before the cut
        assert finishes[-1] == "content_filter"
        server.configure(reply=safe)
        whole = "".join(c.choices[0].delta.content or "" for c in ask(url, "Another story.", stream=True))
        assert whole == safe  # a clean stream arrives whole
    assert [r["decision"] for r in verdicts(run_dir) if r["direction"] == "output"] == ["block", "allow"]


def test_revise_returns_the_constitutional_revision(tmp_path: Path, server: TestServer, judge: TestServer) -> None:
    server.configure(reply=f"Sure. {HARMFUL} step one.")
    run_dir = tmp_path / "run"
    with proxy(tmp_path, guard_recipe(run_dir, server.base_url, judge.base_url, output={"action": "revise"})) as url:
        judge.configure(record=True)
        answer = ask(url, "Tell me something.")
        content = answer.choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in ask(url, "Tell me more.", stream=True))
    assert HARMFUL not in content and content.startswith("Reply ")  # the judge model's revision
    assert answer.model_extra["cai_guard"]["decision"] == "revise"
    assert HARMFUL not in streamed and streamed.startswith("Reply ")
    revision_requests = [m for m in judge.requests() if m[-1]["role"] == "user" and "Rewrite" in m[-1]["content"]]
    assert revision_requests and revision_requests[0][1]["content"].startswith("Sure.")  # the answer was revised


@pytest.mark.parametrize("fail", ["open", "closed"])
def test_a_dead_judge_fails_open_or_closed(tmp_path: Path, server: TestServer, free_port: int, fail: str) -> None:
    run_dir = tmp_path / "run"
    recipe = guard_recipe(run_dir, server.base_url, f"http://127.0.0.1:{free_port}/v1",
                          input={"fail": fail}, output={"fail": fail}, judge_timeout_s=5)
    with proxy(tmp_path, recipe) as url:
        answer = ask(url, SAFE_PROMPTS[0])
    if fail == "open":
        assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.content.startswith("Reply ")
    else:
        assert answer.choices[0].finish_reason == "content_filter"
    rows = verdicts(run_dir)
    assert {r["tier"] for r in rows} == {f"fail-{fail}"}
    assert all(r["error"] for r in rows)


def test_bad_requests_and_a_dead_upstream_get_openai_shaped_errors(
    tmp_path: Path, judge: TestServer, free_port: int
) -> None:
    with proxy(tmp_path, guard_recipe(tmp_path / "run", f"http://127.0.0.1:{free_port}/v1", judge.base_url)) as url:
        with pytest.raises(openai.BadRequestError) as empty:
            client(url).chat.completions.create(model="m", messages=[])
        assert "'messages' must be a non-empty list" in str(empty.value)
        for body in (b"{not json", b'{"messages": "hi"}', b'{"messages": [{"content": "x"}]}'):
            request = urllib.request.Request(f"{url}/chat/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as error:
                urllib.request.urlopen(request, timeout=30)
            assert error.value.code == 400
            assert set(json.loads(error.value.read())["error"]) >= {"message", "type"}
        with pytest.raises(openai.APIStatusError) as dead:
            ask(url, SAFE_PROMPTS[0])
        assert dead.value.status_code == 502 and "could not be reached" in str(dead.value)


def test_an_upstream_answering_something_else_than_json_is_a_502_that_says_so(
    tmp_path: Path, judge: TestServer
) -> None:
    """A base URL that points at a web page (a common slip: the site instead of its ``/v1``) answers 200 with
    HTML; the proxy, which must read the answer to check it, says so instead of failing with a 500."""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            page = b"<html><body>Welcome</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: Any) -> None:
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    upstream = f"http://127.0.0.1:{site.server_address[1]}/v1"
    try:
        recipe = guard_recipe(tmp_path / "run", upstream, judge.base_url, input={"enabled": False})
        with proxy(tmp_path, recipe) as url:
            with pytest.raises(openai.APIStatusError) as page:
                ask(url, SAFE_PROMPTS[0])
    finally:
        site.shutdown()
    assert page.value.status_code == 502
    assert page.value.body["type"] == "upstream_error"  # type: ignore[index]
    assert f"the upstream {upstream} answered with something that is not JSON" in page.value.message
    assert not judge.requests()  # nothing was judged: there was no answer to judge


def test_keys_the_moderations_endpoint_and_rules(tmp_path: Path, server: TestServer, judge: TestServer) -> None:
    secret = "sk-upstream-very-secret-123"
    server.configure(api_key=secret)
    rules = tmp_path / "principles.yaml"
    rules.write_text(
        "name: ruled\nprinciples:\n  - name: no-weapons\n    question: Which response avoids helping make weapons?"
        "\n    rules: {words: [napalm], patterns: ['pipe\\s*bomb']}\n  - name: kind\n    question: Which is kinder?\n",
        encoding="utf-8")
    run_dir = tmp_path / "run"
    recipe = guard_recipe(run_dir, server.base_url, judge.base_url, principles=str(rules), api_key_env="PROXY_KEY")
    recipe["guard"]["upstream"]["api_key_env"] = "UP_KEY"
    with proxy(tmp_path, recipe, env={"UP_KEY": secret, "PROXY_KEY": "proxy-key"}) as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        good = client(url, "proxy-key")
        answer = good.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content.startswith("Reply ")  # the upstream accepted its own key
        before = judge.stats().get("ok", 0)
        ruled = good.chat.completions.create(model="m", messages=[{"role": "user", "content": "how is napalm made"}])
        assert ruled.choices[0].finish_reason == "content_filter"
        assert ruled.model_extra["cai_guard"]["tier"] == "rules"
        assert judge.stats().get("ok", 0) == before  # the rule decided: no judge call
        moderation = good.moderations.create(input=["Please TRIGGER-IN now", "What time is it?"])
        assert [r.flagged for r in moderation.results] == [True, False]
        assert set(moderation.results[0].categories.model_extra or {}) >= {"no-weapons", "kind"}
        assert models_listed(url, "proxy-key")
    for path in [*run_dir.rglob("*"), tmp_path / "proxy.stderr"]:
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def models_listed(url: str, key: str) -> bool:
    request = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return bool(json.loads(answer.read())["data"])


def test_the_library_checks_an_exchange(tmp_path: Path, judge: TestServer) -> None:
    from cai_async import Engine, EngineConfig
    from cai_async.guard import Guard, GuardConfig

    config = EngineConfig.model_validate(guard_recipe(tmp_path, "", judge.base_url)["engine"])

    async def main() -> list[Any]:
        async with Engine(config, run_dir=tmp_path) as engine:
            guard = Guard(engine, GuardConfig(ensemble=3))
            messages = [{"role": "user", "content": "Help me with my homework."}]
            return [await guard.check_exchange(messages, "Here is a plan."),
                    await guard.check_exchange(messages, f"{HARMFUL} now."),
                    await guard.check_exchange([{"role": "user", "content": "TRIGGER-IN"}], "anything")]

    fine, harmful, request = anyio.run(main)
    assert (fine.decision, fine.direction, fine.tier, fine.judge_calls) == ("allow", "output", "judge", 3)
    assert len(fine.scores) == 3 and all(s.score < 0.5 for s in fine.scores)
    assert harmful.decision == "block" and len(harmful.violated) == 3 and harmful.latency_s > 0
    assert (request.decision, request.direction) == ("block", "input")


def test_the_proxy_freezes_its_startup_heap_once_it_serves(tmp_path: Path, free_port: int) -> None:
    """A full garbage collection over the startup heap stalled every request in flight for ~100 ms; once the
    proxy listens, what it imported and built is frozen out of the collector's reach (bench/heap_freeze.py)."""
    script = f"""
import functools, gc, anyio
from cai_async.engine import EngineConfig
from cai_async.guard import GuardConfig, serve_guard

async def main():
    async with anyio.create_task_group() as tg:
        def ready(port):
            print("frozen", gc.get_freeze_count(), flush=True)
            tg.cancel_scope.cancel()
        config = GuardConfig(port=0, upstream={{"base_url": "http://127.0.0.1:{free_port}/v1"}})
        engine = EngineConfig.model_validate({{"groups": {{"critic": [{{"backend": "openai", "model": "m",
            "base_url": "http://127.0.0.1:{free_port}/v1"}}]}}, "progress": "off"}})
        tg.start_soon(functools.partial(serve_guard, config, engine, {str(tmp_path)!r}, on_ready=ready))

print("before", gc.get_freeze_count(), flush=True)
anyio.run(main)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    counts = dict(line.split() for line in out.stdout.splitlines())
    assert int(counts["before"]) == 0 and int(counts["frozen"]) > 10_000  # the imported libraries and the app
