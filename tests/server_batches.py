"""The test server's Batch API: ``/v1/files`` and ``/v1/batches`` as OpenAI documents them.

A local implementation of the documented behaviour, for tests (the hosted API is not reachable here):
files uploaded as multipart (``purpose=batch``), a batch created from an input file moves through
``validating`` → ``in_progress`` → ``finalizing`` → ``completed`` on a clock set by the server config, or ends
``failed`` (validation errors, no output) or ``expired`` (the unfinished part in the error file with
``batch_expired``). Output and error files hold one JSON line per request with its ``custom_id``; planted
faults: per-request 500s, lines left out, lines with unknown ``custom_id``s. Metadata is kept and listed, so a
client can find a batch it created before it crashed.

Statistics: ``files``, ``batches``, ``batch_requests`` (lines submitted) and ``batch_repeats`` (custom_ids
submitted in more than one batch — a client that resumes correctly never repeats a finished request).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

__all__ = ["add_batch_routes"]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": {"message": message, "type": "invalid_request_error"}}, status=status)


def _listing(items: list[dict[str, Any]], request: web.Request) -> dict[str, Any]:
    """A cursor page: newest first, ``after`` an id, ``limit`` items."""
    items = sorted(items, key=lambda item: (item["created_at"], item["id"]), reverse=True)
    after = request.query.get("after")
    if after:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    limit = int(request.query.get("limit", "20"))
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}


def add_batch_routes(app: web.Application, state: Any) -> None:
    """Add the files and batches endpoints to the test server's app; ``state`` is its shared state."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Any) -> web.StreamResponse:
        key = state.config.api_key
        if key and request.path.startswith(("/v1/files", "/v1/batches")) and \
                request.headers.get("Authorization") != f"Bearer {key}":
            state.stats["401"] += 1
            return _error(401, "Incorrect API key provided")
        response: web.StreamResponse = await handler(request)
        return response

    app.middlewares.append(authenticate)
    def new_file(data: bytes, filename: str, purpose: str) -> dict[str, Any]:
        file_id = f"file-{len(state.files) + 1:06d}"
        state.files[file_id] = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                                "filename": filename, "purpose": purpose, "status": "processed", "data": data}
        file: dict[str, Any] = state.files[file_id]
        return file

    def public(file: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in file.items() if k != "data"}

    async def upload(request: web.Request) -> web.Response:
        form = await request.post()
        field, purpose = form.get("file"), str(form.get("purpose", ""))
        if not isinstance(field, web.FileField):
            return _error(400, "no file in the upload")
        state.stats["files"] += 1
        return _json(public(new_file(field.file.read(), field.filename, purpose)))

    async def list_files(request: web.Request) -> web.Response:
        purpose = request.query.get("purpose")
        files = [public(f) for f in state.files.values() if purpose in (None, f["purpose"])]
        return _json(_listing(files, request))

    async def get_file(request: web.Request) -> web.Response:
        file = state.files.get(request.match_info["file_id"])
        return _json(public(file)) if file else _error(404, "No such File object")

    async def file_content(request: web.Request) -> web.Response:
        file = state.files.get(request.match_info["file_id"])
        if file is None:
            return _error(404, "No such File object")
        return web.Response(body=file["data"], content_type="application/octet-stream")

    def finish(batch: dict[str, Any]) -> None:
        """Run the batch's requests and write its output and error files (once, when its time is up)."""
        cfg = state.config
        lines = batch.pop("_lines")
        expired = cfg.batch_outcome == "expired"
        undone = int(len(lines) * cfg.batch_expire_fraction) if expired else 0
        output: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for index, line in enumerate(lines):
            custom_id = line["custom_id"]
            if index >= len(lines) - undone:
                errors.append({"id": f"batch_req_{index}", "custom_id": custom_id, "response": None,
                               "error": {"code": "batch_expired",
                                         "message": "This request could not be executed before the completion "
                                                    "window expired."}})
                continue
            status, payload = state.complete(line["body"])
            if status == 200 and cfg.batch_error_rate and state.rng.random() < cfg.batch_error_rate:
                status, payload = 500, {"error": {"message": "internal error (injected)", "type": "server_error"}}
            record = {"id": f"batch_req_{index}", "custom_id": custom_id,
                      "response": {"status_code": status, "request_id": f"req_{index}", "body": payload},
                      "error": None}
            (output if status == 200 else errors).append(record)
        output = output[cfg.batch_drop_ids:]
        output += [{"id": f"batch_req_x{n}", "custom_id": f"unknown-{batch['id']}-{n}",
                    "response": {"status_code": 200, "request_id": "req_x", "body": {}}, "error": None}
                   for n in range(cfg.batch_unknown_ids)]
        dump = b"".join(orjson.dumps(record) + b"\n" for record in output)
        if output:
            batch["output_file_id"] = new_file(dump, f"{batch['id']}_output.jsonl", "batch_output")["id"]
        if errors:
            dump = b"".join(orjson.dumps(record) + b"\n" for record in errors)
            batch["error_file_id"] = new_file(dump, f"{batch['id']}_error.jsonl", "batch_output")["id"]
        batch["request_counts"] = {"total": len(lines), "completed": len(output) - cfg.batch_unknown_ids,
                                   "failed": len(errors)}
        now = int(time.time())
        batch["status"] = "expired" if expired else "completed"
        batch["expired_at" if expired else "completed_at"] = now

    def advance(batch: dict[str, Any]) -> dict[str, Any]:
        """Move the batch along its documented states by the time since it was created."""
        if batch["status"] not in ("validating", "in_progress", "finalizing"):
            return batch
        cfg = state.config
        age = time.monotonic() - batch["_created"]
        if age < cfg.batch_validating_s:
            return batch
        if cfg.batch_outcome == "failed":
            batch.pop("_lines", None)
            batch.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": [
                {"code": "invalid_request", "message": "The model does not support batches (injected)",
                 "param": None, "line": 1}]})
            return batch
        batch["in_progress_at"] = batch["in_progress_at"] or int(time.time())
        if age < cfg.batch_validating_s + cfg.batch_progress_s:
            batch["status"] = "in_progress"
        elif age < cfg.batch_validating_s + cfg.batch_progress_s + cfg.batch_finalizing_s:
            batch["status"] = "finalizing"
        else:
            finish(batch)
        return batch

    def public_batch(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in advance(batch).items() if not k.startswith("_")}

    def unsupported() -> web.Response | None:
        return None if state.config.batches else _error(404, "Invalid URL (POST /v1/batches)")

    async def create(request: web.Request) -> web.Response:
        if (missing := unsupported()) is not None:
            return missing
        body = orjson.loads(await request.read())
        file = state.files.get(body.get("input_file_id", ""))
        if file is None:
            return _error(400, f"input file {body.get('input_file_id')!r} not found")
        if body.get("endpoint") != "/v1/chat/completions" or body.get("completion_window") != "24h":
            return _error(400, "endpoint must be /v1/chat/completions and completion_window 24h")
        lines = [orjson.loads(line) for line in file["data"].splitlines() if line.strip()]
        if len(lines) > state.config.batch_max_requests:
            return _error(400, f"a batch holds at most {state.config.batch_max_requests} requests; got {len(lines)}")
        ids = [line["custom_id"] for line in lines]
        if len(set(ids)) != len(ids):
            return _error(400, "custom_id values must be unique within a batch")
        for custom_id in ids:
            if state.batch_ids_seen[custom_id]:
                state.stats["batch_repeats"] += 1
            state.batch_ids_seen[custom_id] += 1
        state.stats["batches"] += 1
        state.stats["batch_requests"] += len(lines)
        batch_id = f"batch_{len(state.batches) + 1:06d}"
        now = int(time.time())
        state.batches[batch_id] = {
            "id": batch_id, "object": "batch", "endpoint": body["endpoint"], "errors": None,
            "input_file_id": file["id"], "completion_window": "24h", "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
            "expires_at": now + 86_400, "completed_at": None, "failed_at": None, "expired_at": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": body.get("metadata"), "_created": time.monotonic(), "_lines": lines,
        }
        return _json(public_batch(state.batches[batch_id]))

    async def retrieve(request: web.Request) -> web.Response:
        if (missing := unsupported()) is not None:
            return missing
        batch = state.batches.get(request.match_info["batch_id"])
        return _json(public_batch(batch)) if batch else _error(404, "No such Batch object")

    async def list_batches(request: web.Request) -> web.Response:
        if (missing := unsupported()) is not None:
            return missing
        return _json(_listing([public_batch(b) for b in state.batches.values()], request))

    async def cancel(request: web.Request) -> web.Response:
        batch = state.batches.get(request.match_info["batch_id"])
        if batch is None:
            return _error(404, "No such Batch object")
        if batch["status"] in ("validating", "in_progress", "finalizing"):
            batch.pop("_lines", None)
            batch.update(status="cancelled", cancelled_at=int(time.time()))
        return _json(public_batch(batch))

    app.router.add_post("/v1/files", upload)
    app.router.add_get("/v1/files", list_files)
    app.router.add_get("/v1/files/{file_id}", get_file)
    app.router.add_get("/v1/files/{file_id}/content", file_content)
    app.router.add_post("/v1/batches", create)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_get("/v1/batches/{batch_id}", retrieve)
    app.router.add_post("/v1/batches/{batch_id}/cancel", cancel)
