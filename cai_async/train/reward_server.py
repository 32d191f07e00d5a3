"""``cai reward serve``: OpenRLHF's remote reward protocol over HTTP, scored with the constitutional reward (the
judging GRPO's online reward does, through the engine's judge group) or with a reward model the reward stage
trained (a transformers sequence classifier folder).

The protocol (OpenRLHF 0.11: ``openrlhf/utils/agent.py`` posts, ``openrlhf/cli/serve_rm.py`` answers):
``POST {"query": [prompt + response texts], "prompts": [...], "labels": [...]}`` →
``{"rewards": [...], "scores": [...], "extra_logs": {}}``, one reward per query, in order. A query is the
chat-templated prompt followed by the decoded response; the response is what follows the prompt, with the
template's special tokens taken off, and a ChatML or Llama-3 prompt is read back into its conversation.

Queries from concurrent requests are gathered into batches (``max_batch``, waiting at most ``batch_wait_ms``),
repeats are answered from an in-memory cache (and, for the constitutional reward, the engine's request cache
makes a repeat free across restarts too)."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import orjson
from aiohttp import web

from backends.errors import CaiError, ConfigError
from backends.microbatch import MicroBatcher
from cai_async.engine.config import EngineConfig
from cai_async.exitcodes import leaves
from cai_async.serving import freeze_startup_heap, stop_on_signal
from cai_async.train.config import RewardServerConfig, TrainConfig

__all__ = [
    "RewardServerConfig",
    "RewardService",
    "build_reward_app",
    "constitutional_scorer",
    "reward_model_scorer",
    "serve_rewards",
    "service_for",
    "split_query",
]

Scorer = Callable[[list[tuple[Any, str]]], Awaitable[list[float]]]
"""Scores a batch of ``(prompt, response)``: the prompt is a conversation (a list of messages) or a text."""


_CHATML = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|\Z)", re.DOTALL)
_LLAMA3 = re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)(?:<\|eot_id\|>|\Z)", re.DOTALL)
_SPECIAL = re.compile(r"<\|[A-Za-z0-9_]+\|>|</?s>")


def _conversation(text: str) -> list[dict[str, str]]:
    for pattern in (_CHATML, _LLAMA3):
        turns = [{"role": role, "content": content.strip()} for role, content in pattern.findall(text)]
        if turns:
            return turns
    return []


def split_query(query: str, prompt: str | None) -> tuple[Any, str]:
    """``(prompt, response)`` of an OpenRLHF query: the response is what follows ``prompt`` (or, when the query
    does not start with it, the last assistant turn of a chat-templated query), without special tokens; the
    prompt is its conversation when it is chat-templated, else its text."""
    if prompt and query.startswith(prompt):
        head, response = prompt, query[len(prompt):]
    else:
        turns = _conversation(query)
        if turns and turns[-1]["role"] == "assistant":
            return turns[:-1], _SPECIAL.sub("", turns[-1]["content"]).strip()
        head, response = prompt or "", query
    turns = [t for t in _conversation(head) if t["role"] != "assistant" or t["content"]]
    return (turns or _SPECIAL.sub("", head).strip()), _SPECIAL.sub("", response).strip()


@dataclass(eq=False)
class _Shared:
    """One query being scored, awaited by every request that asks it meanwhile."""

    done: anyio.Event
    value: float | None = None
    error: BaseException | None = None


class RewardService:
    """Batches (:class:`backends.microbatch.MicroBatcher`: ``max_batch`` queries, waiting at most
    ``batch_wait_ms``; batches run concurrently, each in the task of the request that gathered it), caches and
    scores; counts what it did (``stats``)."""

    def __init__(self, scorer: Scorer, config: RewardServerConfig, *,
                 close: Callable[[], Awaitable[None]] | None = None) -> None:
        self.scorer = scorer
        self.config = config
        self.close = close
        self._cache: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._inflight: dict[tuple[str, str], _Shared] = {}
        self._batcher: MicroBatcher[tuple[Any, str], float] = MicroBatcher(
            self._score, max_batch=config.max_batch, window_s=config.batch_wait_ms / 1000)
        self.stats = {"requests": 0, "queries": 0, "cache_hits": 0, "scored": 0, "batches": 0, "errors": 0}

    async def _score(self, batch: list[tuple[Any, str]]) -> Sequence[float]:
        self.stats["batches"] += 1
        self.stats["scored"] += len(batch)
        error: BaseException | None = None
        try:
            values = await self.scorer(batch)
            if len(values) != len(batch):
                raise CaiError(f"the scorer returned {len(values)} rewards for {len(batch)} queries")
        except Exception as exc:  # every waiting request hears why (the first endpoint error, out of its group)
            error = next((e for e in leaves(exc) if isinstance(e, CaiError)), exc)
            self.stats["errors"] += 1
        if error is not None:
            raise error
        return values

    async def _reward(self, key: tuple[str, str], query: str, prompt: str | None) -> float:
        """The reward of one query: from the cache, from a request already asking it, or scored in a batch."""
        while True:
            if key in self._cache:
                self._cache.move_to_end(key)
                self.stats["cache_hits"] += 1
                return self._cache[key]
            shared = self._inflight.get(key)
            if shared is not None:
                self.stats["cache_hits"] += 1
                await shared.done.wait()
                if shared.error is not None:
                    raise shared.error
                if shared.value is not None:
                    return shared.value
                continue  # the request asking it was cancelled: ask again
            shared = self._inflight[key] = _Shared(anyio.Event())
            try:
                value = shared.value = float(await self._batcher.submit(split_query(query, prompt)))
            except Exception as exc:
                shared.error = exc
                raise
            finally:
                del self._inflight[key]
                shared.done.set()
            if self.config.cache_size:
                self._cache[key] = value
                if len(self._cache) > self.config.cache_size:
                    self._cache.popitem(last=False)
            return value

    async def rewards(self, queries: list[str], prompts: list[str | None]) -> list[float]:
        """One reward per query, in order; the first failed query's error."""
        self.stats["requests"] += 1
        self.stats["queries"] += len(queries)
        out: list[float | BaseException] = [0.0] * len(queries)

        async def one(index: int, key: tuple[str, str], query: str, prompt: str | None) -> None:
            try:
                out[index] = await self._reward(key, query, prompt)
            except Exception as exc:
                out[index] = exc

        async with anyio.create_task_group() as tg:  # the queries of a request join the same batches
            for index, (query, prompt) in enumerate(zip(queries, prompts, strict=True)):
                key = (prompt or "", query)
                if key in self._cache:  # no task for a hit
                    self._cache.move_to_end(key)
                    self.stats["cache_hits"] += 1
                    out[index] = self._cache[key]
                else:
                    tg.start_soon(one, index, key, query, prompt)
        for value in out:
            if isinstance(value, BaseException):
                raise value
        return [float(v) for v in out if not isinstance(v, BaseException)]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def build_reward_app(service: RewardService) -> web.Application:
    """The aiohttp application: ``POST /get_reward`` (and ``POST /``), ``GET /health``, ``GET /stats``."""
    app = web.Application(client_max_size=256 * 1024 * 1024)

    async def get_reward(request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _json({"error": "the body is not JSON; send {\"query\": [...], \"prompts\": [...]}"}, 400)
        queries = body.get("query") if isinstance(body, dict) else None
        if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
            return _json({"error": "'query' must be a list of texts (prompt + response)"}, 400)
        prompts = body.get("prompts") or [None] * len(queries)
        if not isinstance(prompts, list) or len(prompts) != len(queries):
            return _json({"error": f"'prompts' must be a list as long as 'query' ({len(queries)})"}, 400)
        try:
            rewards = await service.rewards(queries, [p if isinstance(p, str) else None for p in prompts])
        except CaiError as exc:  # the judge or the model failed: say why, on one line
            return _json({"error": f"{type(exc).__name__}: {exc}".replace("\n", " ")}, 502)
        return _json({"rewards": rewards, "scores": rewards, "extra_logs": {}})

    async def health(_: web.Request) -> web.Response:
        return _json({"ok": True})

    async def stats(_: web.Request) -> web.Response:
        return _json(service.stats)

    app.router.add_post("/get_reward", get_reward)
    app.router.add_post("/", get_reward)
    app.router.add_get("/health", health)
    app.router.add_get("/stats", stats)
    return app


def constitutional_scorer(reward: Any) -> Scorer:
    """A :class:`~cai_async.train.rewards.ConstitutionalReward` as a batch scorer: the batch is judged
    concurrently on the engine."""

    async def score(batch: list[tuple[Any, str]]) -> list[float]:
        values = [0.5] * len(batch)

        async def one(index: int) -> None:
            values[index] = await reward.score(*batch[index])

        async with anyio.create_task_group() as tg:
            for index in range(len(batch)):
                tg.start_soon(one, index)
        return values

    return score


def reward_model_scorer(folder: str | Path, *, max_length: int = 1024) -> Scorer:
    """A trained reward model (transformers sequence classifier folder, one label) as a batch scorer: the batch
    goes through the model in one padded forward pass, in a worker thread."""
    import torch

    from cai_async.train.models import load_model, load_tokenizer

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: no reward model with config.json (a transformers sequence classifier folder)")
    tokenizer = load_tokenizer(str(path))
    tokenizer.padding_side = "right"
    model = load_model(str(path), task="reward")
    model.eval()
    lock = anyio.Lock()

    def forward(texts: list[str]) -> list[float]:
        encoded = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                            add_special_tokens=False)
        with torch.no_grad():
            logits = model(**encoded).logits
        return [float(v) for v in logits[:, 0].tolist()]

    def text(prompt: Any, response: str) -> str:
        turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        rendered = tokenizer.apply_chat_template([*turns, {"role": "assistant", "content": response}],
                                                 tokenize=False)
        return str(rendered)

    async def score(batch: list[tuple[Any, str]]) -> list[float]:
        async with lock:  # one forward pass at a time; the batch is the parallelism
            return await anyio.to_thread.run_sync(forward, [text(p, r) for p, r in batch])

    return score


async def service_for(config: TrainConfig, run_dir: str | Path,
                      engine_config: EngineConfig | None = None) -> RewardService:
    """The service ``config`` asks for: the constitutional reward on ``engine_config``'s critic group (the
    questions of ``train.rl_principles``, ``rl_ensemble`` of them a completion, as GRPO's reward), or the
    reward model (``train.reward_server.reward_model``, default the run's trained one)."""
    from cai_async.train.models import trained_reward_model

    server = config.reward_server
    if (server.reward_from or config.reward_from) == "reward_model":
        folder = Path(server.reward_model) if server.reward_model else trained_reward_model(Path(run_dir))
        return RewardService(reward_model_scorer(folder, max_length=config.max_length), server)
    if engine_config is None:
        raise ConfigError("the constitutional reward needs the recipe's engine (its judge group)")
    from cai_async.train.rewards import ConstitutionalReward

    reward = ConstitutionalReward(engine_config, run_dir, principles=config.rl_principles,
                                  ensemble=config.rl_ensemble, seed=config.seed)
    return RewardService(constitutional_scorer(reward), server, close=reward.aclose)


async def serve_rewards(service: RewardService, *, on_ready: Callable[[int], None] | None = None,
                        stop: anyio.Event | None = None, signals: bool = True) -> None:
    """Serve ``service`` on its config's host and port until SIGTERM/SIGINT (with ``signals``; only the main
    thread can) or ``stop``; then close what the scorer opened."""
    config = service.config
    runner = web.AppRunner(build_reward_app(service), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=4096)
    try:
        await site.start()
        if signals:  # the process is this server's (``cai reward serve``), not a host's that serves it on a thread
            freeze_startup_heap()
        if on_ready is not None:
            on_ready(int(runner.addresses[0][1]))
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.sleep_forever)  # until a signal or ``stop`` cancels it
            if signals:
                tg.start_soon(stop_on_signal, tg.cancel_scope)
            if stop is not None:
                tg.start_soon(_stop_on_event, stop, tg.cancel_scope)
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()
            if service.close is not None:
                await service.close()


async def _stop_on_event(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()

