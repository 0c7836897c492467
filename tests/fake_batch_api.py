"""A fake OpenAI Batch API on 127.0.0.1: the fake OpenAI server plus files and batches.

    POST /v1/files                  multipart upload (purpose=batch) -> file object
    POST /v1/batches                {input_file_id, endpoint, completion_window} -> batch object
    GET  /v1/batches/{id}           the batch, moving validating -> in_progress -> a final status
    POST /v1/batches/{id}/cancel
    GET  /v1/files/{id}/content     the uploaded input, or the output / error file

A batch runs its requests when it reaches its final status, with the same vectors as the
synchronous `/v1/embeddings` route (`expected_vector`), so both paths can be compared. Ways to
misbehave, set on the server before the batch is created:

- `polls_until_done`: looks at the batch that answer `in_progress` before it finishes;
- `fail_markers`: {marker: HTTP status}: a request whose text contains the marker fails with it
  (a line in the error file), the others succeed: a partial failure;
- `expire_after`: the batch ends `expired` after that many requests; the rest are written to
  the error file with code `batch_expired`, as the real API does;
- `reject_input`: the batch ends `failed` (its input was refused) with no files;
- `poll_failures`: the next looks at a batch answer 503.
"""

from __future__ import annotations

import base64
import itertools
import json
import time
from email.parser import BytesParser
from email.policy import HTTP

from tests.fake_openai_server import FakeOpenAIServer, _FakeOpenAIHandler, expected_vector

FINAL = ("completed", "expired", "failed", "cancelled")


class FakeBatchAPIServer(FakeOpenAIServer):
    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.files: dict[str, dict] = {}  # id -> {"bytes": ..., "filename": ..., "purpose": ...}
        self.batches: dict[str, dict] = {}
        self.polls_until_done = 1
        self.fail_markers: dict[str, int] = {}
        self.expire_after: int | None = None
        self.reject_input = False
        self.poll_failures = 0
        self.batch_calls: list[str] = []  # "upload", "create", "retrieve", "content", "cancel" in order
        self._ids = itertools.count(1)

    def created_batches(self) -> list[dict]:
        return list(self.batches.values())

    # -- the routes (called by the handler, under no lock: tests drive one client at a time) --
    def upload(self, filename: str, purpose: str, content: bytes) -> dict:
        self.batch_calls.append("upload")
        return self._file(filename, purpose, content)

    def create(self, body: dict) -> tuple[int, dict]:
        self.batch_calls.append("create")
        if body.get("input_file_id") not in self.files:
            return 400, {"error": {"message": "input_file_id not found", "type": "invalid_request_error"}}
        batch_id = f"batch_{next(self._ids)}"
        self.batches[batch_id] = {
            "id": batch_id, "object": "batch", "endpoint": body.get("endpoint"), "errors": None,
            "input_file_id": body["input_file_id"], "completion_window": body.get("completion_window"),
            "status": "validating", "output_file_id": None, "error_file_id": None,
            "created_at": int(time.time()), "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata"), "_polls": 0,
            "_settings": (self.polls_until_done, dict(self.fail_markers), self.expire_after, self.reject_input),
        }
        return 200, self._public(batch_id)

    def retrieve(self, batch_id: str) -> tuple[int, dict]:
        self.batch_calls.append("retrieve")
        if self.poll_failures:
            self.poll_failures -= 1
            return 503, {"error": {"message": "the server had an error", "type": "server_error"}}
        batch = self.batches.get(batch_id)
        if batch is None:
            return 404, {"error": {"message": f"no batch {batch_id}", "type": "invalid_request_error"}}
        if batch["status"] not in FINAL:
            batch["_polls"] += 1
            if batch["_polls"] > batch["_settings"][0]:
                self._run(batch)
            else:
                batch["status"] = "in_progress"
        return 200, self._public(batch_id)

    def cancel(self, batch_id: str) -> tuple[int, dict]:
        self.batch_calls.append("cancel")
        self.batches[batch_id]["status"] = "cancelled"
        return 200, self._public(batch_id)

    def content(self, file_id: str) -> bytes | None:
        self.batch_calls.append("content")
        file = self.files.get(file_id)
        return None if file is None else file["bytes"]

    # -- running a batch ----------------------------------------------------------------------
    def _run(self, batch: dict) -> None:
        _, fail_markers, expire_after, reject_input = batch["_settings"]
        requests = [json.loads(line) for line in self.files[batch["input_file_id"]]["bytes"].splitlines() if line.strip()]
        batch["request_counts"]["total"] = len(requests)
        if reject_input:
            batch["status"] = "failed"
            batch["errors"] = {"object": "list", "data": [
                {"code": "invalid_request", "message": "the input file is not valid", "line": 1}]}
            return
        outputs, errors = [], []
        for number, request in enumerate(requests):
            text, body = str(request["body"]["input"]), request["body"]
            if expire_after is not None and number >= expire_after:
                errors.append({"id": f"req_{number}", "custom_id": request["custom_id"], "response": None,
                               "error": {"code": "batch_expired",
                                         "message": "This request could not be executed before the completion window expired."}})
                continue
            status = next((code for marker, code in fail_markers.items() if marker in text), 200)
            if status != 200:
                errors.append({"id": f"req_{number}", "custom_id": request["custom_id"], "error": None,
                               "response": {"status_code": status, "request_id": f"r{number}",
                                            "body": {"error": {"message": "invalid input", "type": "invalid_request_error"}}}})
                continue
            outputs.append({"id": f"req_{number}", "custom_id": request["custom_id"], "error": None,
                            "response": {"status_code": 200, "request_id": f"r{number}",
                                         "body": self._embedding(body, text)}})
        batch["status"] = "expired" if expire_after is not None and expire_after < len(requests) else "completed"
        batch["request_counts"].update(completed=len(outputs), failed=len(errors))
        if outputs:
            batch["output_file_id"] = self._file("output.jsonl", "batch_output", _jsonl(outputs))["id"]
        if errors:
            batch["error_file_id"] = self._file("errors.jsonl", "batch_output", _jsonl(errors))["id"]

    def _embedding(self, body: dict, text: str) -> dict:
        vector = expected_vector(text, int(body.get("dimensions") or self.default_dimensions))
        encoded = (base64.b64encode(vector.tobytes()).decode("ascii") if body.get("encoding_format") == "base64"
                   else vector.tolist())
        tokens = max(1, len(text) // 4)
        return {"object": "list", "model": body.get("model"), "data": [{"object": "embedding", "index": 0, "embedding": encoded}],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def _file(self, filename: str, purpose: str, content: bytes) -> dict:
        file_id = f"file-{next(self._ids)}"
        self.files[file_id] = {"bytes": content, "filename": filename, "purpose": purpose}
        return {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed"}

    def _public(self, batch_id: str) -> dict:
        return {k: v for k, v in self.batches[batch_id].items() if not k.startswith("_")}


def _jsonl(records: list[dict]) -> bytes:
    return ("\n".join(json.dumps(r) for r in records) + "\n").encode("utf-8")


class _BatchHandler(_FakeOpenAIHandler):
    fake: FakeBatchAPIServer

    def do_GET(self) -> None:
        parts = self.path.split("?", 1)[0].strip("/").split("/")  # v1, files|batches, id, [content]
        if len(parts) == 4 and parts[1] == "files" and parts[3] == "content":
            content = self.fake.content(parts[2])
            if content is None:
                self._send_json(404, {"error": {"message": f"no file {parts[2]}"}})
            else:
                self._send_raw(200, content)
        elif len(parts) == 3 and parts[1] == "batches":
            self._send_json(*self.fake.retrieve(parts[2]))
        else:
            super().do_GET()

    def do_POST(self) -> None:
        parts = self.path.split("?", 1)[0].strip("/").split("/")
        if parts[1:] == ["files"]:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._send_json(200, self._upload(raw))
        elif parts[1:] == ["batches"]:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            self._send_json(*self.fake.create(body))
        elif len(parts) == 4 and parts[1] == "batches" and parts[3] == "cancel":
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._send_json(*self.fake.cancel(parts[2]))
        else:
            super().do_POST()

    def _upload(self, raw: bytes) -> dict:
        header = f"Content-Type: {self.headers.get('Content-Type')}\r\n\r\n".encode()
        message = BytesParser(policy=HTTP).parsebytes(header + raw)
        fields, filename, content = {}, "upload.jsonl", b""
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if part.get_filename():
                filename, content = part.get_filename(), part.get_payload(decode=True)
            else:
                fields[name] = part.get_payload(decode=True).decode()
        return self.fake.upload(filename, fields.get("purpose", ""), content)


FakeBatchAPIServer.handler_class = _BatchHandler
