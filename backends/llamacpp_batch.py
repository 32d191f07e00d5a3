"""Continuous batching for one loaded GGUF model: concurrent calls share one ``llama_decode`` per step.

A :class:`BatchDecoder` owns a second llama.cpp context on the model's weights (its other settings copied
from the ``Llama`` object's) with ``sequences`` KV streams of ``n_ctx`` tokens each (``kv_unified=False``).
Its memory is fixed at creation: KV bytes per token × ``n_ctx`` × ``sequences`` (SmolLM2-135M: about 23 KB
per token, so 2048 × 8 is about 380 MB; a 7B Llama about 128 KB per token). Each step builds one batch,
grouped by sequence in increasing id: the next token of every running sequence and prompt tokens of newly
joined ones (chunked prefill), ``batch_tokens`` in all. llama.cpp evaluates one run of consecutive sequence
ids per pass, so free sequences are handed out lowest id first to keep the running ones together.
Separate streams keep a sequence's attention to itself (one shared cache, ``kv_unified``, moved logits by
up to ~0.8 with neighbours); what remains is rounding: kernels sum in an order that depends on the batch and
on where cached tokens sit, so greedy answers may part from the unbatched path's at near-ties (tests bound it).
Sequences join and leave between steps, each with its own sampler chain (the one llama-cpp-python's
``create_completion`` builds: top-k 40, typical 1, top-p, min-p 0.05, temperature, seeded dist; greedy at
temperature 0), its own stop strings and ``max_tokens``. Choice scoring is a sequence that stops after its
prompt and hands back the last position's logits.

Prefix reuse: a free sequence keeps its KV after its call, so a new prompt that starts with it (a critique
after the answer it critiques, a revision after its critique) evaluates only the new tokens; when another
sequence holds a prefix at least 32 tokens longer, its KV stream is copied (``llama_memory_seq_cp``, applied
before the next step) and trimmed to the shared part.

The decode loop runs on the process's llama.cpp compute thread (:mod:`backends.llama_thread`): a caller
queues its job, makes sure the loop is queued there, and waits for its job's event. The loop runs steps while
any job is running or waiting and re-queues itself after a step when other work waits on that thread (another
model's loop, a model loading), so nothing runs when nobody waits and models take turns step by step.
A cancelled caller's job is dropped at the next step.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends.llama_thread import Waiter, compute_thread

__all__ = ["BatchDecoder", "Generation", "SamplingOptions"]

_COPY_MIN_GAIN = 32
"""Copy another sequence's KV stream (the whole stream: megabytes) only when it saves this many prompt tokens."""



@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingOptions:
    """How a sequence picks its tokens and when it stops."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Generation:
    """What a finished sequence produced: the text (cut at the first stop string), why it ended, token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    reused_tokens: int
    """Prompt tokens whose KV came from an earlier call (not evaluated again)."""
    tokens: tuple[int, ...] = ()
    """The completion's token ids (an end-of-generation token is not among them)."""


@dataclass(eq=False)
class _Job:
    prompt: list[int]
    options: SamplingOptions | None  # None: scoring (logits after the prompt)
    slot: int = -1
    fed: int = 0
    reused: int = 0
    out: list[int] = field(default_factory=list)
    sampler: Any = None
    logits_index: int = -1
    logits: np.ndarray | None = None
    finish: str = ""
    error: BaseException | None = None
    done: bool = False
    waiter: Waiter = field(default_factory=Waiter)

    @property
    def cancelled(self) -> bool:
        return self.waiter.abandoned


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class BatchDecoder:
    """A shared decode loop over ``sequences`` KV sequences of ``n_ctx`` tokens on ``llama``'s weights."""

    def __init__(
        self, llama: Any, *, sequences: int, n_ctx: int, batch_tokens: int, n_threads: int, n_threads_batch: int
    ) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self._llama = llama  # keeps the weights alive
        params = llama_cpp.llama_context_params.from_buffer_copy(llama.context_params)  # same attention, types
        params.n_ctx = n_ctx * sequences
        params.n_batch = params.n_ubatch = batch_tokens
        params.n_seq_max = sequences
        params.n_threads = n_threads
        params.n_threads_batch = n_threads_batch
        params.kv_unified = False
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(llama._model.model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {sequences} × {n_ctx} tokens")
        self._ctx = ctx
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._vocab = llama._model.vocab
        self._n_vocab = int(llama.n_vocab())
        self.sequences = sequences
        self.n_ctx = n_ctx
        self.batch_tokens = batch_tokens
        self._batch = llama_cpp.llama_batch_init(batch_tokens, 0, 1)
        self._slots: list[_Job | None] = [None] * sequences
        self._kv: list[list[int]] = [[] for _ in range(sequences)]  # tokens whose KV each sequence holds
        self._last_used = [0] * sequences
        self._pending: list[_Job] = []
        self._lock = threading.Lock()
        self._queued = False  # the loop is queued on (or running in) the compute thread
        self.steps = 0
        self.decoded_tokens = 0
        self.prompt_tokens_evaluated = 0
        self.reused_tokens = 0
        self.most_sequences = 0
        self.copies = 0
        self._occupancy = 0

    def close(self) -> None:
        """Free the context and the batch (the weights belong to the ``Llama`` object)."""
        if self._ctx:
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self._ctx)
            self._ctx = None

    def stats(self) -> dict[str, Any]:
        """Counters for run summaries."""
        return {
            "sequences": self.sequences,
            "n_ctx_per_sequence": self.n_ctx,
            "batch_tokens": self.batch_tokens,
            "running_sequences": sum(job is not None for job in self._slots),
            "steps": self.steps,
            "decoded_tokens": self.decoded_tokens,
            "prompt_tokens_evaluated": self.prompt_tokens_evaluated,
            "prompt_tokens_reused": self.reused_tokens,
            "prefix_copies": self.copies,
            "most_sequences_in_a_step": self.most_sequences,
            "mean_sequences_per_step": round(self._occupancy / self.steps, 2) if self.steps else 0.0,
        }

    # -- the async side -----------------------------------------------------------------------------------
    async def _submit(self, job: _Job) -> _Job:
        with self._lock:
            self._pending.append(job)
            start, self._queued = not self._queued, True
        if start:
            compute_thread.post(self._loop)
        await job.waiter.wait()  # cancelled: the loop drops the job at its next step
        if job.error is not None:
            raise job.error
        return job

    async def generate(self, prompt: list[int], options: SamplingOptions) -> Generation:
        """Complete ``prompt`` (token ids; shorter than ``n_ctx``) with its own sampler, in the shared batch."""
        job = await self._submit(_Job(list(prompt), options))
        text = bytes(self._llama.detokenize(job.out))
        for stop in options.stop:
            if stop.encode("utf-8") in text:
                text = text[: text.index(stop.encode("utf-8"))]
                break
        return Generation(
            text=text.decode("utf-8", errors="ignore"), finish_reason=job.finish, prompt_tokens=len(prompt),
            completion_tokens=len(job.out), reused_tokens=job.reused, tokens=tuple(job.out),
        )

    async def last_logits(self, prompt: list[int]) -> tuple[np.ndarray, int]:
        """The logits after ``prompt`` (float32, one per vocabulary entry) and the prompt tokens reused."""
        job = await self._submit(_Job(list(prompt), None))
        assert job.logits is not None
        return job.logits, job.reused

    # -- the decode thread --------------------------------------------------------------------------------
    def _loop(self) -> None:
        """Steps while jobs run or wait; yields the thread to other queued work after a step."""
        try:
            while True:
                self._step()
                with self._lock:
                    if not self._pending and all(job is None for job in self._slots):
                        self._queued = False
                        return
                if compute_thread.busy():
                    compute_thread.post(self._loop)  # still queued: take turns with the other work
                    return
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            with self._lock:
                jobs = [job for job in self._slots if job is not None] + self._pending
                self._pending.clear()
                self._queued = False
            for job in jobs:
                if job.slot >= 0:
                    self._lib.llama_memory_seq_rm(self._memory, job.slot, -1, -1)
                    self._kv[job.slot].clear()
                self._finish(job, error=RuntimeError(f"the decode loop failed: {exc!r}"))

    def _finish(self, job: _Job, reason: str = "", error: BaseException | None = None) -> None:
        job.finish, job.error, job.done = reason, error, True
        if job.sampler is not None:
            self._lib.llama_sampler_free(job.sampler)
            job.sampler = None
        if job.slot >= 0 and self._slots[job.slot] is job:
            self._slots[job.slot] = None
        job.waiter.wake()

    def _new_sampler(self, options: SamplingOptions) -> Any:
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if options.temperature <= 0.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        else:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(40))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_typical(1.0, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(options.top_p, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(0.05, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(options.temperature))
            seed = options.seed if options.seed is not None else lib.LLAMA_DEFAULT_SEED
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def _admit(self) -> None:
        """Give free sequences to waiting jobs (lowest id first), reusing the longest KV prefix any sequence holds."""
        with self._lock:
            waiting = [job for job in self._pending if not job.cancelled]
            self._pending.clear()
        for job in waiting:
            free = [s for s in range(self.sequences) if self._slots[s] is None]
            if not free:
                break
            limit = len(job.prompt) - 1  # the last prompt token is always evaluated, for its logits
            own = {s: _common_prefix(self._kv[s], job.prompt, limit) for s in free}
            best = max(free, key=lambda s: (own[s], -s))
            slot = best if own[best] - own[free[0]] >= _COPY_MIN_GAIN else free[0]  # else keep the ids packed
            keep = own[slot]
            source = max(range(self.sequences), key=lambda s: _common_prefix(self._kv[s], job.prompt, limit))
            shared = _common_prefix(self._kv[source], job.prompt, limit)
            lib = self._lib
            if source != slot and shared - keep >= _COPY_MIN_GAIN:
                lib.llama_memory_seq_cp(self._memory, source, slot, -1, -1)  # the whole stream, then trimmed
                self._kv[slot] = self._kv[source][:shared]
                keep = shared
                self.copies += 1
            lib.llama_memory_seq_rm(self._memory, slot, keep, -1)
            del self._kv[slot][keep:]
            job.slot, job.fed, job.reused = slot, keep, keep
            self.reused_tokens += keep
            if job.options is not None:
                job.sampler = self._new_sampler(job.options)
            self._slots[slot] = job
        with self._lock:
            left = [job for job in waiting if job.slot < 0]
            self._pending[:0] = left

    def _add(self, token: int, slot: int, logits: bool) -> int:
        batch, i = self._batch, int(self._batch.n_tokens)
        batch.token[i] = token
        batch.pos[i] = len(self._kv[slot])
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = slot
        batch.logits[i] = logits
        batch.n_tokens = i + 1
        self._kv[slot].append(token)
        return i

    def _step(self) -> None:
        """One ``llama_decode``: every running sequence's next token, then prompt chunks within the budget."""
        for job in self._slots:
            if job is not None and job.cancelled:
                self._finish(job, "cancelled")
        self._admit()
        self._batch.n_tokens = 0
        active = [job for job in self._slots if job is not None]  # in sequence order: one run per pass
        decoding = [job for job in active if job.fed == len(job.prompt) and job.out]
        budget = self.batch_tokens - len(decoding)
        chunks: dict[int, int] = {}
        for job in active:
            if job.fed < len(job.prompt) and budget > 0:
                chunks[job.slot] = min(budget, len(job.prompt) - job.fed)
                budget -= chunks[job.slot]
        for job in active:
            job.logits_index = -1
            if job.fed == len(job.prompt) and job.out:  # decoding: feed the token sampled last step
                job.logits_index = self._add(job.out[-1], job.slot, True)
            elif job.slot in chunks:
                take = chunks[job.slot]
                for k in range(job.fed, job.fed + take):
                    index = self._add(job.prompt[k], job.slot, k == len(job.prompt) - 1)
                job.fed += take
                self.prompt_tokens_evaluated += take
                if job.fed == len(job.prompt):
                    job.logits_index = index
        if self._batch.n_tokens == 0:
            return
        code = self._lib.llama_decode(self._ctx, self._batch)
        if code != 0:
            error = RuntimeError(f"llama_decode failed with code {code} on a batch of {self._batch.n_tokens} tokens")
            for job in active:
                self._lib.llama_memory_seq_rm(self._memory, job.slot, -1, -1)
                self._kv[job.slot].clear()
                self._finish(job, error=error)
            return
        self.steps += 1
        self._occupancy += len(active)
        self.most_sequences = max(self.most_sequences, len(active))
        for job in active:
            self._last_used[job.slot] = self.steps
            if job.logits_index >= 0:
                self._after_logits(job)

    def _after_logits(self, job: _Job) -> None:
        lib = self._lib
        if job.options is None:
            pointer = lib.llama_get_logits_ith(self._ctx, job.logits_index)
            job.logits = np.ctypeslib.as_array(pointer, shape=(self._n_vocab,)).copy()
            self._finish(job, "stop")
            return
        token = int(lib.llama_sampler_sample(job.sampler, self._ctx, job.logits_index))
        self.decoded_tokens += 1
        if lib.llama_vocab_is_eog(self._vocab, token):
            self._finish(job, "stop")
            return
        job.out.append(token)
        options = job.options
        text = bytes(self._llama.detokenize(job.out)) if options.stop else b""
        if any(stop.encode("utf-8") in text for stop in options.stop):
            self._finish(job, "stop")
        elif len(job.out) >= options.max_tokens or len(job.prompt) + len(job.out) >= self.n_ctx:
            self._finish(job, "length")
