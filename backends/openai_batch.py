"""Backend for the OpenAI Batch API (``/v1/files`` + ``/v1/batches``), built on the official ``openai`` SDK.

Calls are not sent one by one: each waits in a queue, and once no new call has come for ``linger_s`` the queue
goes out as one batch (split at the provider's request-count and file-size limits). Multi-step work therefore
runs in rounds: every chain that is ready puts its next step (critique, then revision) into the same batch.
The batch's JSONL input file is written and recorded in a journal (:mod:`backends.batch_journal`) before it is
uploaded, and the upload and the batch creation are recorded before and after they happen; a rerun after a
crash finds its batches (by file name and by a metadata tag) and polls them instead of submitting again.
Failed, expired and missing requests go into a later batch up to ``max_attempts`` times, then fail for good;
output lines with a ``custom_id`` nobody asked for are kept in the journal and reported.

Tested against the project's own implementation of the documented API (``tests/server_batches.py``).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import orjson
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from backends.atomic import write_atomic
from backends.base import BackendTraits, BaseBackend
from backends.batch_journal import BatchEntry, BatchJournal, Outcome
from backends.errors import (
    BackendError,
    CaiError,
    ConfigError,
    MissingLogprobs,
    PermanentError,
    TransientError,
    redact,
)
from backends.openai_wire import chat_body, chat_result, error_for_status, score_body, score_logprobs, score_result
from backends.options import OpenAIBatchOptions, parse_options
from backends.registry import BackendSettings
from backends.types import ChatRequest, ChatResult, ScoreRequest, ScoreResult

__all__ = ["OpenAIBatchBackend", "custom_id"]

log = logging.getLogger("cai_async.batch")

T = TypeVar("T")

_TERMINAL = ("completed", "failed", "expired", "cancelled")
_RETRY_CODES = ("batch_expired", "batch_cancelled")


def custom_id(body: dict[str, Any]) -> str:
    """The request's id inside batches: a hash of its body, so a rerun asks for the same id and identical
    requests (the same step of two identical chains) are sent and paid for once."""
    return "cai-" + hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()[:40]


@dataclass
class _Waiter:
    event: anyio.Event = field(default_factory=anyio.Event)
    outcome: dict[str, Any] | BaseException | None = None
    since: float = field(default_factory=time.perf_counter)


class OpenAIBatchBackend(BaseBackend):
    """Chat and choice scoring through an OpenAI-compatible Batch API; see the module docstring.

    Options (:class:`backends.options.OpenAIBatchOptions`): ``settings.options["batch"]``, from the endpoint's
    ``batch:`` section (``max_requests``, ``max_file_mb``, ``completion_window``, ``linger_s``, ``poll_initial_s``,
    ``poll_max_s``, ``max_attempts``, ``request_retries``, ``in_flight``); ``top_logprobs`` and ``prefill`` as for
    the online backend. Needs ``settings.state_dir`` for its journal. Use as an async context manager (the engine
    does): its rounds and polls run in its own task group.
    """

    def __init__(self, settings: BackendSettings) -> None:
        if not settings.base_url:
            raise ConfigError(f"endpoint {settings.endpoint!r}: batch mode needs base_url (e.g. https://api.openai.com/v1)")
        if not settings.state_dir:
            raise ConfigError(f"endpoint {settings.endpoint!r}: batch mode needs a run directory for its journal")
        self.name = settings.endpoint
        self.model = settings.model
        self._settings = settings
        options = parse_options(OpenAIBatchOptions, settings.options, backend="openai-batch", endpoint=self.name)
        batch = options.batch
        self.traits = BackendTraits(queues_calls=True, round_items=batch.in_flight, summary_key="batches")
        self._max_requests = batch.max_requests
        self._max_bytes = int(batch.max_file_mb * 1_000_000)
        self._window = batch.completion_window
        self._linger = batch.linger_s
        self._poll_initial = batch.poll_initial_s
        self._poll_max = batch.poll_max_s
        self._max_attempts = batch.max_attempts
        self._step_attempts = batch.request_retries
        self._top_logprobs = min(20, options.top_logprobs)
        self._prefill = options.prefill
        self.journal = BatchJournal(Path(settings.state_dir))
        self._client: Any = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._queue: list[tuple[str, dict[str, Any]]] = []
        self._queued = anyio.Event()
        self._waiters: dict[str, _Waiter] = {}
        self._in_flight: dict[str, str] = {}
        self._fatal: CaiError | None = None
        self._stalled: dict[str, BackendError] = {}

    def __repr__(self) -> str:
        return f"OpenAIBatchBackend(endpoint={self.name!r}, base_url={self._settings.base_url!r}, model={self.model!r})"

    # -- lifecycle -------------------------------------------------------------------------------------------

    def _open_client(self) -> None:
        try:
            import openai
        except ModuleNotFoundError:
            raise ConfigError("batch mode needs the official openai package: pip install 'cai-async[batch]'") from None
        self._client = openai.AsyncOpenAI(
            base_url=self._settings.base_url, api_key=self._settings.api_key.get_secret_value() or "unused",
            timeout=self._settings.timeout_s, max_retries=0,  # retried here, where a repeat cannot double-submit
        )

    async def cancel_unfinished(self) -> list[dict[str, Any]]:
        """Stop paying for a run that will not be resumed: cancel every batch the journal has in flight at the
        provider, wait for each to settle, and record what it finished (cancelled requests are submitted again
        by a later run); batches never submitted are dropped locally. Returns what became of each batch."""
        self._open_client()
        done: list[dict[str, Any]] = []
        try:
            for entry in self.journal.unfinished():
                if entry.state == "creating" and (found := await self._step("find", self._find_batch, entry)):
                    entry = self.journal.update(entry.local_id, state="submitted", batch_id=found)
                if entry.state != "submitted":  # nothing was created at the provider: nothing to pay for
                    self.journal.finish(entry.local_id, [], [], status="dropped")
                    done.append({"batch": entry.local_id, "status": "dropped", "requests": entry.requests})
                    continue
                try:
                    await self._step("cancel", lambda e: self._client.batches.cancel(e.batch_id), entry)
                except PermanentError as exc:  # finished already (409 and the like): collect it as it is
                    log.info("endpoint %s: batch %s not cancelled: %s", self.name, entry.batch_id, exc)
                batch = await self._poll(entry)
                await self._finish(entry, batch)
                done.append({"batch": entry.local_id, "id": entry.batch_id, "status": batch.status,
                             "requests": entry.requests})
        finally:
            await self.aclose()
        return done

    async def __aenter__(self) -> OpenAIBatchBackend:
        self._open_client()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._in_flight = self.journal.in_flight()
        self._tg.start_soon(self._collect)
        for entry in self.journal.unfinished():
            log.info("endpoint %s: resuming batch %s (%s)", self.name, entry.local_id, entry.batch_id or entry.state)
            self._tg.start_soon(self._drive, entry)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(None, None, None)
            self._tg = None
        await self.aclose()

    async def aclose(self) -> None:
        if self._client is not None:
            with anyio.CancelScope(shield=True):
                await self._client.close()
            self._client = None

    def summary(self) -> dict[str, Any]:
        """The journal's counts (batches by status, results, failed attempts, unknown output lines)."""
        return self.journal.summary()

    # -- the Backend protocol ---------------------------------------------------------------------------------

    async def chat(self, request: ChatRequest) -> ChatResult:
        payload, latency = await self._submit(chat_body(self.model, request))
        return chat_result(payload, model=self.model, endpoint=self.name, latency_s=latency, make=self._error)

    async def score(self, request: ScoreRequest) -> ScoreResult:
        payload, latency = await self._submit(
            score_body(self.model, request, top_logprobs=self._top_logprobs, prefill=self._prefill)
        )
        top = score_logprobs(payload, self._error)
        if top is None:
            raise self._error(
                MissingLogprobs, "batch answer carries no logprobs; scoring in batch mode needs a model that returns "
                "top_logprobs (or use mode: online with score_fallback: sample)",
            )
        return score_result(payload, top, request, model=self.model, endpoint=self.name, latency_s=latency)

    def _error(self, cls: type[BackendError], message: str, **kwargs: Any) -> BackendError:
        text = redact(f"endpoint {self.name!r} (batch, {self._settings.base_url}): {message}",
                      [self._settings.api_key.get_secret_value()])
        return cls(text, endpoint=self.name, **kwargs)

    async def _submit(self, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
        if self._tg is None:
            raise RuntimeError("use the batch backend inside 'async with' (the engine does this)")
        if self._fatal is not None:
            raise self._fatal
        cid = custom_id(body)
        waiter = self._waiters.get(cid)
        if waiter is None:
            if (final := self.journal.result(cid)) is not None:
                return self._unwrap(final), 0.0
            if cid in self._stalled:
                raise self._stalled[cid]
            waiter = self._waiters[cid] = _Waiter()
            if cid not in self._in_flight:
                attempts, last = self.journal.attempts(cid)
                if attempts >= self._max_attempts:
                    self._waiters.pop(cid)
                    raise self._error(PermanentError, f"{last} (failed in {attempts} batches; giving up, raise "
                                      "batch.max_attempts and rerun to try again)")
                self._queue.append((cid, body))
                self._queued.set()
        await waiter.event.wait()
        if isinstance(waiter.outcome, BaseException):
            raise waiter.outcome
        assert waiter.outcome is not None
        return waiter.outcome, time.perf_counter() - waiter.since

    def _unwrap(self, outcome: Outcome) -> dict[str, Any]:
        if outcome.payload is None:
            raise self._error(PermanentError, outcome.error or "failed in its batch")
        return outcome.payload

    def _deliver(self, cid: str, outcome: dict[str, Any] | BaseException) -> None:
        waiter = self._waiters.pop(cid, None)
        if waiter is not None:
            waiter.outcome = outcome
            waiter.event.set()

    # -- rounds -----------------------------------------------------------------------------------------------

    async def _collect(self) -> None:
        """Close a round once no new call came for ``linger_s`` (or it is full), and submit it."""
        while True:
            await self._queued.wait()
            deadline = time.monotonic() + max(10 * self._linger, 1.0)
            seen = -1
            while seen != len(self._queue) and len(self._queue) < self._max_requests and time.monotonic() < deadline:
                seen = len(self._queue)
                await anyio.sleep(self._linger)
            taken, self._queue = self._queue, []
            self._queued = anyio.Event()
            for chunk in self._split(taken):
                try:
                    entry = self.journal.prepare(chunk)
                except (OSError, sqlite3.Error) as exc:  # a full disk, say: nothing was sent, nothing is lost
                    problem = ConfigError(f"endpoint {self.name!r}: cannot write the batch journal in "
                                          f"{self.journal.folder} ({exc}); free space or fix permissions and rerun")
                    for cid, _ in chunk:
                        self._deliver(cid, problem)
                    continue
                for cid, _ in chunk:
                    self._in_flight[cid] = entry.local_id
                log.info("endpoint %s: batch %s of %d requests prepared", self.name, entry.local_id, len(chunk))
                assert self._tg is not None
                self._tg.start_soon(self._drive, entry)

    def _split(self, taken: list[tuple[str, dict[str, Any]]]) -> list[list[tuple[str, bytes]]]:
        """JSONL lines in chunks within the request-count and file-size limits."""
        chunks: list[list[tuple[str, bytes]]] = [[]]
        size = 0
        for cid, body in taken:
            line = orjson.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body})
            line += b"\n"
            if chunks[-1] and (len(chunks[-1]) >= self._max_requests or size + len(line) > self._max_bytes):
                chunks.append([])
                size = 0
            chunks[-1].append((cid, line))
            size += len(line)
        return [chunk for chunk in chunks if chunk]

    # -- one batch, from upload to outcomes -------------------------------------------------------------------

    async def _drive(self, entry: BatchEntry) -> None:
        """Take a batch from wherever the journal says it is to its recorded outcomes. Never raises: a failure
        is delivered to the calls waiting on the batch (the journal keeps it, so a rerun resumes it)."""
        try:
            if entry.state in ("prepared", "uploading"):
                entry = await self._step("upload", self._upload, entry)
            if entry.state in ("uploaded", "creating"):
                entry = await self._step("create", self._create, entry)
            batch = await self._poll(entry)
            await self._finish(entry, batch)
        except CaiError as exc:
            self._abandon(entry, exc)
        except Exception as exc:  # an SDK answer we could not read: keep the batch for a rerun
            self._abandon(entry, self._error(TransientError, f"{type(exc).__name__}: {exc}"))

    def _abandon(self, entry: BatchEntry, exc: CaiError) -> None:
        if isinstance(exc, ConfigError):  # including AuthenticationFailed
            self._fatal = exc  # every further call gets the same clear message
            self._queue.clear()
            for cid in list(self._waiters):
                self._deliver(cid, exc)
        members = self.journal.members(entry.local_id)
        for cid in members:
            if isinstance(exc, TransientError):
                self._stalled[cid] = exc
            self._in_flight.pop(cid, None)
            self._deliver(cid, exc)
        if isinstance(exc, PermanentError) and self._fatal is None:
            self.journal.finish(entry.local_id, [Outcome(c, error=str(exc)) for c in members], [], status="rejected")
        log.warning("endpoint %s: batch %s stopped: %s", self.name, entry.local_id, exc)

    async def _step(self, name: str, action: Callable[[BatchEntry], Awaitable[T]], entry: BatchEntry) -> T:
        """Run one remote step, retrying connection errors, timeouts, 429 and 5xx with backoff."""
        retrying = AsyncRetrying(
            sleep=anyio.sleep, reraise=True, stop=stop_after_attempt(self._step_attempts),
            wait=wait_random_exponential(multiplier=self._poll_initial, max=self._poll_max),
            retry=retry_if_exception_type(TransientError),
        )
        async for attempt in retrying:
            with attempt:
                try:
                    return await action(entry)
                except CaiError:
                    raise
                except Exception as exc:
                    raise self._translate(exc, name) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _translate(self, exc: Exception, step: str) -> CaiError:
        import openai

        if isinstance(exc, openai.APIStatusError):
            if exc.status_code == 404 and step == "create":
                return ConfigError(redact(
                    f"endpoint {self.name!r} ({self._settings.base_url}): this provider does not support the Batch "
                    "API (404 on /v1/batches); set the endpoint's mode to online (or drop --batch)",
                    [self._settings.api_key.get_secret_value()]))
            detail = str(exc.message)
            return error_for_status(exc.status_code, f"{step}: {detail}", self._error)
        if isinstance(exc, openai.APIConnectionError):  # includes timeouts
            return self._error(TransientError, f"{step}: cannot reach the Batch API ({type(exc).__name__})")
        return self._error(TransientError, f"{step}: {type(exc).__name__}: {exc}")

    async def _upload(self, entry: BatchEntry) -> BatchEntry:
        if entry.state == "uploading":  # an upload may have landed before a crash: look for it by name
            async for file in self._client.files.list(purpose="batch", order="desc", limit=100):
                if file.filename == entry.filename:
                    return self.journal.update(entry.local_id, state="uploaded", file_id=file.id)
                if file.created_at < entry.created - 300:
                    break
        entry = self.journal.update(entry.local_id, state="uploading")
        data = self.journal.input_path(entry.local_id).read_bytes()
        file = await self._client.files.create(file=(entry.filename, data, "application/jsonl"), purpose="batch")
        return self.journal.update(entry.local_id, state="uploaded", file_id=file.id)

    async def _create(self, entry: BatchEntry) -> BatchEntry:
        if entry.state == "creating":  # a batch may exist already: look for our tag before paying again
            found = await self._find_batch(entry)
            if found is not None:
                return self.journal.update(entry.local_id, state="submitted", batch_id=found, status="found")
        entry = self.journal.update(entry.local_id, state="creating")
        batch = await self._client.batches.create(
            input_file_id=entry.file_id, endpoint="/v1/chat/completions", completion_window=self._window,
            metadata={"cai_batch": entry.local_id, "cai_endpoint": self.name[:400]},
        )
        log.info("endpoint %s: batch %s submitted as %s", self.name, entry.local_id, batch.id)
        return self.journal.update(entry.local_id, state="submitted", batch_id=batch.id, status=batch.status)

    async def _find_batch(self, entry: BatchEntry) -> str | None:
        async for batch in self._client.batches.list(limit=100):
            if (batch.metadata or {}).get("cai_batch") == entry.local_id:
                return str(batch.id)
            if batch.created_at < entry.created - 300:
                break
        return None

    async def _poll(self, entry: BatchEntry) -> Any:
        delay = self._poll_initial
        while True:
            batch = await self._step("poll", lambda e: self._client.batches.retrieve(e.batch_id), entry)
            if batch.status != entry.status:
                counts = batch.request_counts
                log.info("endpoint %s: batch %s is %s (%s)", self.name, batch.id, batch.status,
                         f"{counts.completed}/{counts.total} done" if counts else "")
                entry = self.journal.update(entry.local_id, status=batch.status)
            if batch.status in _TERMINAL:
                return batch
            await anyio.sleep(delay)
            delay = min(delay * 1.5, self._poll_max)

    async def _download(self, file_id: str | None, entry: BatchEntry, kind: str) -> list[bytes]:
        if not file_id:
            return []
        content = await self._step("download", lambda e: self._client.files.content(file_id), entry)
        data: bytes = content.content
        write_atomic(self.journal.folder / f"{entry.local_id}.{kind}.jsonl", data)
        return [line for line in data.splitlines() if line.strip()]

    async def _finish(self, entry: BatchEntry, batch: Any) -> None:
        """Map the output and error files back to the requests; record and deliver every outcome."""
        members = set(self.journal.members(entry.local_id))
        lines = await self._download(batch.output_file_id, entry, "output")
        lines += await self._download(batch.error_file_id, entry, "errors")
        by_id: dict[str, Outcome] = {}
        unknown: list[tuple[str | None, bytes]] = []
        for raw in lines:
            try:
                line = orjson.loads(raw)
                cid = line.get("custom_id")
            except (orjson.JSONDecodeError, AttributeError):
                unknown.append((None, raw))
                continue
            if cid not in members:
                unknown.append((cid, raw))
                continue
            by_id[cid] = self._outcome(cid, line)
        if unknown:
            log.warning("endpoint %s: batch %s returned %d line(s) with unknown custom_id; kept in the journal",
                        self.name, batch.id, len(unknown))
        failed = "; ".join(f"{e.code}: {e.message}" for e in (batch.errors.data or [])) if batch.errors else ""
        outcomes = []
        for cid in sorted(members):
            if cid in by_id:
                outcomes.append(by_id[cid])
            elif batch.status == "failed":
                reason = failed or "no reason given"
                outcomes.append(Outcome(cid, error=f"batch {batch.id} failed validation: {reason}"))
            else:
                outcomes.append(Outcome(cid, error=f"missing from batch {batch.id}'s output ({batch.status})",
                                        retry=True))
        if batch.status == "cancelled":  # not run, not failed: no attempt is spent, a later run submits them again
            outcomes = [o for o in outcomes if not o.retry]
        missing = sum(1 for cid in members if cid not in by_id)
        if missing and batch.status != "failed":
            log.warning("endpoint %s: %d request(s) of batch %s came back in neither file (%s); resubmitting",
                        self.name, missing, batch.id, batch.status)
        self.journal.finish(entry.local_id, outcomes, unknown, status=batch.status)
        waiting = {o.custom_id for o in outcomes if o.retry and o.custom_id in self._waiters}
        bodies = self.journal.bodies(entry.local_id, waiting) if waiting else {}
        for outcome in outcomes:
            self._in_flight.pop(outcome.custom_id, None)
            if outcome.retry:
                attempts, last = self.journal.attempts(outcome.custom_id)
                if attempts >= self._max_attempts:
                    self._deliver(outcome.custom_id, self._error(
                        PermanentError, f"{last} (failed in {attempts} batches; giving up, raise batch.max_attempts "
                        "and rerun to try again)"))
                elif outcome.custom_id in bodies:
                    self._queue.append((outcome.custom_id, bodies[outcome.custom_id]))
                    self._queued.set()
            elif outcome.payload is not None:
                self._deliver(outcome.custom_id, outcome.payload)
            else:
                self._deliver(outcome.custom_id, self._error(PermanentError, outcome.error or "failed"))

    def _outcome(self, cid: str, line: dict[str, Any]) -> Outcome:
        error = line.get("error")
        if error:
            code = str(error.get("code") or "")
            return Outcome(cid, error=f"{code}: {error.get('message', '')}", retry=code in _RETRY_CODES)
        response = line.get("response") or {}
        status = int(response.get("status_code") or 0)
        body = response.get("body") or {}
        if status == 200 and isinstance(body, dict):
            return Outcome(cid, payload=body)
        detail = str((body.get("error") or {}).get("message", "")) if isinstance(body, dict) else ""
        problem = error_for_status(status, detail or "no detail", self._error)
        return Outcome(cid, error=str(problem), retry=not isinstance(problem, PermanentError))
