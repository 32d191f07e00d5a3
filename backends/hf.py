"""A Hugging Face transformers model in this process (a trained folder, a merged model, or an adapter whose base
loads from a folder): chat through ``generate``, choice scoring from the last position's logits, in a worker
thread. torch and transformers are imported when the backend is created.

Concurrent calls are batched (a simpler scheme than the llama.cpp backend's continuous batching), through a
:class:`backends.microbatch.MicroBatcher` per loaded model and kind of call (chat with the same temperature and
top-p, or scoring): a batch waits up to ``batch_window_s`` for company (less once ``batch_size`` calls wait),
then runs as one left-padded ``generate`` (one forward per step for the batch) or one forward pass, one batch
of a model at a time.
A batch generates up to its longest ``max_tokens``; each answer is cut to its own ``max_tokens``, its end of
sequence and its stop strings. Sampled batches are seeded with their first call's seed, so a seeded call is
reproducible only alone (``batch_size: 1``); greedy answers equal the one-at-a-time ones up to the
floating-point effect of padding.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio

from backends.base import BackendTraits, BaseBackend
from backends.errors import BackendError, ConfigError, PermanentError
from backends.microbatch import MicroBatcher
from backends.options import TransformersOptions, parse_options
from backends.registry import BackendSettings
from backends.scoring import normalize_choice_logprobs
from backends.types import ChatRequest, ChatResult, ScoreRequest, ScoreResult, Usage, plain_messages

__all__ = ["TransformersBackend"]

_INSTALL_HINT = "pip install 'cai-async[train]'"
_LOCK = threading.Lock()


@dataclass(eq=False)
class _Call:
    backend: TransformersBackend
    request: ChatRequest | ScoreRequest
    result: ChatResult | ScoreResult | None = None
    error: BaseException | None = None

    def group_key(self) -> tuple[Any, ...]:
        """Calls with equal keys can share one ``generate`` (or one forward pass, for scoring)."""
        request = self.request
        if isinstance(request, ScoreRequest):
            return ("score",)
        return ("chat", request.temperature > 0, round(request.temperature, 6), round(request.top_p, 6))


@dataclass(eq=False)
class _Loaded:
    model: Any
    tokenizer: Any
    limiter: anyio.CapacityLimiter
    """One batch of this model at a time, whichever batcher it comes from."""
    batchers: dict[tuple[Any, ...], MicroBatcher[_Call, ChatResult | ScoreResult]] = field(default_factory=dict)
    """By the calls' group key, batch size and window: the calls each one gathers can share a batch."""


_MODELS: dict[str, _Loaded] = {}


class TransformersBackend(BaseBackend):
    """``settings.model``: a local model folder (``config.json``) or a peft adapter folder
    (``adapter_config.json``). Options (:class:`backends.options.TransformersOptions`): ``batch_size`` (calls run
    together; default the endpoint's ``max_concurrency``, else 8; 1: one at a time), ``batch_window_s`` (0.01: how
    long a batch waits for company)."""

    def __init__(self, settings: BackendSettings) -> None:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ModuleNotFoundError:
            raise ConfigError(f"the transformers backend needs torch and transformers: {_INSTALL_HINT}") from None
        self.path = Path(settings.model)
        if not (self.path / "config.json").is_file() and not (self.path / "adapter_config.json").is_file():
            raise ConfigError(f"endpoint {settings.endpoint!r}: {self.path} is not a model folder "
                              "(config.json) or a peft adapter folder (adapter_config.json)")
        self.name = settings.endpoint
        self.model_name = self.path.name if self.path.name not in ("merged", "") else self.path.parent.name
        options = parse_options(TransformersOptions, settings.options, backend="transformers", endpoint=self.name)
        self.batch_size = options.batch_size or settings.max_concurrency or 8
        self._window_s = options.batch_window_s
        self.traits = BackendTraits(sequences=self.batch_size, summary_key="local")
        self._loaded: _Loaded | None = None
        self._batches = self._largest = 0

    def _load(self) -> _Loaded:
        key = str(self.path.resolve())
        with _LOCK:
            if key not in _MODELS:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                if (self.path / "adapter_config.json").is_file():
                    from peft import AutoPeftModelForCausalLM

                    model = AutoPeftModelForCausalLM.from_pretrained(self.path)
                else:
                    model = AutoModelForCausalLM.from_pretrained(self.path)
                model.eval()
                tokenizer = AutoTokenizer.from_pretrained(self.path)
                tokenizer.padding_side = "left"  # batched prompts end together, where generation starts
                if tokenizer.pad_token_id is None:
                    tokenizer.pad_token = tokenizer.eos_token
                _MODELS[key] = _Loaded(model, tokenizer, anyio.CapacityLimiter(1))
            return _MODELS[key]

    def _prompt_ids(self, tokenizer: Any, messages: list[dict[str, str]], prefix: str = "") -> Any:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefix
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]

    def _check_length(self, model: Any, prompt_tokens: int, max_tokens: int) -> None:
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and prompt_tokens + max_tokens > limit:
            raise PermanentError(f"endpoint {self.name!r}: prompt of {prompt_tokens} tokens plus max_tokens "
                                 f"{max_tokens} exceeds the model's {limit}", endpoint=self.name)

    def _chat_sync(self, model: Any, tokenizer: Any, request: ChatRequest) -> ChatResult:
        import torch

        start = time.perf_counter()
        ids = self._prompt_ids(tokenizer, plain_messages(request.messages))
        self._check_length(model, int(ids.shape[1]), request.max_tokens)
        if request.seed is not None:
            torch.manual_seed(request.seed)
        sampling = {"do_sample": True, "temperature": request.temperature, "top_p": request.top_p} \
            if request.temperature > 0 else {"do_sample": False}
        with torch.no_grad():
            output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=request.max_tokens,
                                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
        new = output[0][ids.shape[1]:]
        text = tokenizer.decode(new, skip_special_tokens=True)
        for stop in request.stop:
            text = text.split(stop)[0]
        return ChatResult(text=text, finish_reason="length" if len(new) >= request.max_tokens else "stop",
                          usage=Usage(prompt_tokens=int(ids.shape[1]), completion_tokens=len(new)),
                          model=self.model_name, endpoint=self.name, latency_s=time.perf_counter() - start)

    def _score_sync(self, model: Any, tokenizer: Any, request: ScoreRequest) -> ScoreResult:
        import torch

        start = time.perf_counter()
        ids = self._prompt_ids(tokenizer, plain_messages(request.messages), request.answer_prefix)
        with torch.no_grad():
            logits = model(ids).logits[0, -1].float()
        candidates = _candidates(tokenizer, torch.log_softmax(logits, dim=-1), request.choices)
        return ScoreResult(probs=normalize_choice_logprobs(candidates, request.choices, endpoint=self.name),
                           method="logits", usage=Usage(prompt_tokens=int(ids.shape[1]), completion_tokens=0),
                           model=self.model_name, endpoint=self.name, latency_s=time.perf_counter() - start)

    async def _run(self, request: ChatRequest | ScoreRequest) -> Any:
        if self._loaded is None:
            self._loaded = await anyio.to_thread.run_sync(self._load)
        loaded = self._loaded
        call = _Call(self, request)
        window = self._window_s if self.batch_size > 1 else 0.0
        key = (*call.group_key(), self.batch_size, window)
        batcher = loaded.batchers.get(key)
        if batcher is None:
            batcher = loaded.batchers[key] = MicroBatcher(
                partial(_answer, loaded), max_batch=self.batch_size, window_s=window, limiter=loaded.limiter,
                shield=True)  # the worker thread runs to its end anyway: its answers are kept
        return await batcher.submit(call)

    def summary(self) -> dict[str, Any]:
        """Batching settings and counters, for ``summary.json`` and tests."""
        return {"model": self.model_name, "batch_size": self.batch_size, "batches": self._batches,
                "largest_batch": self._largest}

    async def chat(self, request: ChatRequest) -> ChatResult:
        result: ChatResult = await self._run(request)
        return result

    async def score(self, request: ScoreRequest) -> ScoreResult:
        result: ScoreResult = await self._run(request)
        return result

    async def aclose(self) -> None:
        """Models stay cached for other endpoints of this process."""


def run_group(loaded: _Loaded, group: list[_Call]) -> None:
    """Answer a group of compatible calls: one at a time for a single call, else in one padded batch. Each call's
    own failure (a prompt too long) stays its own; a failure of the batch is every call's."""
    try:
        if len(group) == 1:
            call = group[0]
            if isinstance(call.request, ChatRequest):
                call.result = call.backend._chat_sync(loaded.model, loaded.tokenizer, call.request)
            else:
                call.result = call.backend._score_sync(loaded.model, loaded.tokenizer, call.request)
        elif isinstance(group[0].request, ChatRequest):
            _chat_batch(loaded, group)
        else:
            _score_batch(loaded, group)
    except Exception as exc:
        for call in group:
            if call.result is None and call.error is None:
                call.error = exc


async def _answer(loaded: _Loaded, group: list[_Call]) -> list[ChatResult | ScoreResult | BaseException]:
    """A :class:`MicroBatcher`'s batch: ``group`` answered in a worker thread, each call's result or error."""
    for backend in {call.backend for call in group}:
        backend._batches += 1
        backend._largest = max(backend._largest, len(group))
    await anyio.to_thread.run_sync(run_group, loaded, group)
    return [call.error if call.error is not None else call.result if call.result is not None
            else BackendError("the batch gave this call no answer", endpoint=call.backend.name) for call in group]


def _encode(loaded: _Loaded, texts: list[str]) -> tuple[Any, Any, Any]:
    """Left-padded ids, attention mask and position ids (counted from each prompt's first real token)."""
    encoded = loaded.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    mask = encoded["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return encoded["input_ids"], mask, positions


def _chat_batch(loaded: _Loaded, group: list[_Call]) -> None:
    import torch

    start = time.perf_counter()
    model, tokenizer = loaded.model, loaded.tokenizer
    texts: list[str] = []
    ready: list[_Call] = []
    for call in group:
        assert isinstance(call.request, ChatRequest)
        text = tokenizer.apply_chat_template(plain_messages(call.request.messages), tokenize=False,
                                             add_generation_prompt=True)
        length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        try:
            call.backend._check_length(model, length, call.request.max_tokens)
        except PermanentError as exc:
            call.error = exc
            continue
        texts.append(text)
        ready.append(call)
    if not ready:
        return
    requests = [call.request for call in ready]
    assert all(isinstance(r, ChatRequest) for r in requests)
    first = requests[0]
    assert isinstance(first, ChatRequest)
    if first.seed is not None:
        torch.manual_seed(first.seed)
    sampling = {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p} \
        if first.temperature > 0 else {"do_sample": False}
    ids, mask, _ = _encode(loaded, texts)
    longest = max(r.max_tokens for r in requests if isinstance(r, ChatRequest))
    with torch.no_grad():
        output = model.generate(ids, attention_mask=mask, max_new_tokens=longest,
                                pad_token_id=tokenizer.pad_token_id, **sampling)
    eos = model.generation_config.eos_token_id
    ends = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    for index, (row, call) in enumerate(zip(output[:, ids.shape[1]:].tolist(), ready, strict=True)):
        request = call.request
        assert isinstance(request, ChatRequest)
        new = row[: request.max_tokens]
        cut = next((k for k, token in enumerate(new) if token in ends), None)
        new = new[: cut + 1] if cut is not None else new
        text = tokenizer.decode(new, skip_special_tokens=True)
        for stop in request.stop:
            text = text.split(stop)[0]
        backend = call.backend
        call.result = ChatResult(
            text=text, finish_reason="length" if len(new) >= request.max_tokens else "stop",
            usage=Usage(prompt_tokens=int(mask[index].sum()),
                        completion_tokens=len(new)),
            model=backend.model_name, endpoint=backend.name, latency_s=time.perf_counter() - start)


def _score_batch(loaded: _Loaded, group: list[_Call]) -> None:
    import torch

    start = time.perf_counter()
    model, tokenizer = loaded.model, loaded.tokenizer
    texts = []
    for call in group:
        assert isinstance(call.request, ScoreRequest)
        texts.append(tokenizer.apply_chat_template(plain_messages(call.request.messages), tokenize=False,
                                                   add_generation_prompt=True) + call.request.answer_prefix)
    ids, mask, positions = _encode(loaded, texts)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids, attention_mask=mask, position_ids=positions).logits[:, -1].float(), -1)
    for index, call in enumerate(group):
        request = call.request
        assert isinstance(request, ScoreRequest)
        backend = call.backend
        try:
            call.result = ScoreResult(
                probs=normalize_choice_logprobs(_candidates(tokenizer, logprobs[index], request.choices),
                                                request.choices, endpoint=backend.name),
                method="logits", usage=Usage(prompt_tokens=int(mask[index].sum()), completion_tokens=0),
                model=backend.model_name, endpoint=backend.name, latency_s=time.perf_counter() - start)
        except BackendError as exc:
            call.error = exc


def _candidates(tokenizer: Any, logprobs: Any, choices: tuple[str, ...]) -> dict[str, float]:
    """Log-probabilities of each choice's single-token spellings (``"A"``, ``" A"``)."""
    candidates: dict[str, float] = {}
    for choice in choices:
        for variant in (choice, " " + choice):
            tokens = tokenizer.encode(variant, add_special_tokens=False)
            if len(tokens) == 1:
                candidates[variant] = float(logprobs[tokens[0]])
    return candidates
