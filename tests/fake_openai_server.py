"""A fake OpenAI-compatible server on 127.0.0.1 for tests and benchmarks.

It serves `POST /v1/embeddings` and `POST /v1/chat/completions` from a threaded stdlib HTTP
server (HTTP/1.1 keep-alive, like the real API) and can be told to misbehave:

- latency per request, and a token-bucket rate limit (requests/s) answered with 429,
  `Retry-After` / `retry-after-ms` and `x-ratelimit-*-requests` headers;
- faults, either scripted for the next requests, applied to every request (`fail_all`), drawn at
  random for a share of requests (`transient_rate`), or tied to texts that contain a marker
  (`poison`): see FAULTS;
- counters kept server-side: requests, statuses, per-text request counts, in-flight and maximum
  in-flight concurrency, arrival times, Authorization headers seen.

Vectors are deterministic per text (`expected_vector`), unit length, so a test can check that
every stored vector belongs to its text. Usable from the benchmark as well:

    with FakeOpenAIServer(latency_s=0.05, rate_limit_rps=200) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x")

or from a shell: `python -m tests.fake_openai_server --latency 0.05 --rate-limit 200` (it prints
its base URL; `GET /_stats` and `GET /_reset` serve the counters to another process).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

# Request-level faults (the whole response) ...
RATE_LIMIT = "rate_limit"  # 429 with Retry-After
SERVER_ERROR = "server_error"  # 500
UNAVAILABLE = "unavailable"  # 503
HANG = "hang"  # no answer for hang_seconds, then the connection is closed
DROP = "drop"  # the connection is closed without an answer
MALFORMED_JSON = "malformed_json"  # 200 with a truncated JSON body (chat: content that is not JSON)
WRONG_DIMS = "wrong_dims"  # every vector one element too long
SHORT = "short"  # one vector fewer than inputs
WRONG_ORDER = "wrong_order"  # data reversed, `index` still right: a correct client reorders
DUPLICATE_INDEX = "duplicate_index"  # every `index` is 0
BAD_REQUEST = "bad_request"  # 400
UNAUTHORIZED = "unauthorized"  # 401
ECHO_AUTH = "echo_auth"  # 401 whose error message repeats the Authorization header (a leaky server)
# ... and an item-level one, for poison texts only:
NAN = "nan"  # the poisoned text's vector is NaN (other vectors are fine)

FAULTS = (
    RATE_LIMIT, SERVER_ERROR, UNAVAILABLE, HANG, DROP, MALFORMED_JSON, WRONG_DIMS, SHORT,
    WRONG_ORDER, DUPLICATE_INDEX, BAD_REQUEST, UNAUTHORIZED, ECHO_AUTH, NAN,
)  # fmt: skip
TRANSIENT_FAULTS = (RATE_LIMIT, SERVER_ERROR, UNAVAILABLE, DROP, MALFORMED_JSON, SHORT)
OK = "ok"


def expected_vector(text: str, dimensions: int) -> np.ndarray:
    """The unit vector the server returns for `text` (seeded by its sha256)."""
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dimensions).astype(np.float32)
    return vector / np.linalg.norm(vector)


@dataclass
class _TokenBucket:
    rate: float
    capacity: float
    tokens: float = field(init=False)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = self.capacity

    def take(self) -> float | None:
        """Take one token; None if granted, else the seconds until one is available."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return None
        return (1 - self.tokens) / self.rate

    def seconds_to_full(self) -> float:
        return (self.capacity - self.tokens) / self.rate


@dataclass
class ServerStats:
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    statuses: Counter = field(default_factory=Counter)
    faults: Counter = field(default_factory=Counter)
    per_text: Counter = field(default_factory=Counter)  # texts requested
    answered_per_text: Counter = field(default_factory=Counter)  # texts whose 200 answer was written out
    arrivals: list[float] = field(default_factory=list)
    limited: list[bool] = field(default_factory=list)  # per arrival: refused by the rate limit
    authorization_headers: set[str] = field(default_factory=set)  # "Bearer ..." or "api-key ..." (Azure)
    paths: Counter = field(default_factory=Counter)  # request paths with their query strings


class FakeOpenAIServer:
    handler_class: type = None  # type: ignore[assignment]  # set below: _FakeOpenAIHandler; subclasses add routes

    def __init__(
        self,
        *,
        latency_s: float = 0.0,
        rate_limit_rps: float | None = None,
        burst: float | None = None,
        default_dimensions: int = 384,
        transient_rate: float = 0.0,
        transient_faults: Iterable[str] = TRANSIENT_FAULTS,
        retry_after_s: float = 0.05,
        retry_after_headers: str = "both",  # "seconds", "ms" or "both"
        hang_seconds: float = 5.0,
        reject_base64: bool = False,
        api_key: str | None = None,
        models: Iterable[str] | None = None,
        seed: int = 0,
        port: int = 0,
    ) -> None:
        self.latency_s = latency_s
        self.default_dimensions = default_dimensions
        self.transient_rate = transient_rate
        self.transient_faults = tuple(transient_faults)
        self.retry_after_s = retry_after_s
        self.retry_after_headers = retry_after_headers
        self.hang_seconds = hang_seconds
        self.reject_base64 = reject_base64  # like servers that only speak JSON floats
        self.api_key = api_key  # set: any other key is refused with 401
        self.models = set(models) if models is not None else None  # set: any other model is a 404
        self.fail_all: str | None = None
        self.poison: dict[str, str] = {}  # marker substring -> fault for any request carrying it
        self.chat_content = None  # callable(user texts) -> the assistant's content; None: an echo summary
        self.stats = ServerStats()
        self._scripted: deque[str] = deque()
        self._bucket = _TokenBucket(rate_limit_rps, burst or max(1.0, rate_limit_rps / 10)) if rate_limit_rps else None
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAIServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes hanging handlers
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control ----------------------------------------------------------------------------
    def script(self, *faults: str) -> None:
        """Faults for the next requests, in order (`"ok"` for a normal answer)."""
        with self._lock:
            self._scripted.extend(faults)

    def reset_stats(self) -> None:
        with self._lock:
            in_flight = self.stats.in_flight
            self.stats = ServerStats(in_flight=in_flight)

    def stats_summary(self) -> dict:
        with self._lock:
            stats = self.stats
            return {
                "requests": stats.requests,
                "max_in_flight": stats.max_in_flight,
                "statuses": {str(k): v for k, v in stats.statuses.items()},
                "faults": dict(stats.faults),
                "distinct_texts": len(stats.per_text),
                "repeated_texts": sum(1 for n in stats.per_text.values() if n > 1),
                "arrivals": stats.arrivals[-20_000:],  # monotonic seconds, comparable across processes
                "limited": stats.limited[-20_000:],
            }

    def set_rate_limit(self, rate_limit_rps: float | None, burst: float | None = None) -> None:
        with self._lock:
            self._bucket = _TokenBucket(rate_limit_rps, burst or max(1.0, rate_limit_rps / 10)) if rate_limit_rps else None

    # -- request bookkeeping (called by the handler) -----------------------------------------
    def _arrive(
        self, texts: list[str], authorization: str | None, path: str
    ) -> tuple[str, float | None, dict[str, str]]:
        """Count the request and decide its fate: (fault, retry_after, rate-limit headers)."""
        with self._lock:
            stats = self.stats
            stats.requests += 1
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
            stats.arrivals.append(time.monotonic())
            stats.per_text.update(texts)
            stats.paths[path] += 1
            if authorization:
                stats.authorization_headers.add(authorization)
            wait, headers = self._rate_limit_locked()
            stats.limited.append(wait is not None)
            if wait is not None:
                fault = RATE_LIMIT
            else:
                fault = self._pick_fault_locked(texts)
            stats.faults[fault] += 1
            return fault, wait, headers

    def _rate_limit_locked(self) -> tuple[float | None, dict[str, str]]:
        if self._bucket is None:
            return None, {}
        wait = self._bucket.take()
        headers = {
            "x-ratelimit-limit-requests": str(int(self._bucket.capacity)),
            "x-ratelimit-remaining-requests": str(max(0, int(self._bucket.tokens))),
            "x-ratelimit-reset-requests": f"{max(1, round(self._bucket.seconds_to_full() * 1000))}ms",
        }
        return wait, headers

    def _pick_fault_locked(self, texts: list[str]) -> str:
        if self._scripted:
            return self._scripted.popleft()
        if self.fail_all:
            return self.fail_all
        for marker, fault in self.poison.items():
            if any(marker in text for text in texts):
                return fault
        if self.transient_rate and self._random.random() < self.transient_rate:
            return self._random.choice(self.transient_faults)
        return OK

    def _leave(self, status: int | None, texts: list[str]) -> None:
        with self._lock:
            self.stats.in_flight -= 1
            self.stats.statuses[status or "dropped"] += 1
            if status == 200:
                self.stats.answered_per_text.update(texts)

    def _pause(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)


def _handler_for(server: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(server.handler_class):  # type: ignore[name-defined]
        fake = server

    return Handler


class _FakeOpenAIHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeOpenAIServer

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        """`GET /_stats` (counters as JSON) and `GET /_reset`, for a server in another process."""
        if self.path in ("/_stats", "/_reset"):
            summary = self.fake.stats_summary()  # the counters so far, then reset if asked
            if self.path == "/_reset":
                self.fake.reset_stats()
            self._send_json(200, summary)
        else:
            self._send_json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        route = self.path.split("?", 1)[0].rstrip("/")
        if route.endswith("/embeddings"):
            texts = _as_list(body.get("input"))
        elif route.endswith("/chat/completions"):
            texts = [str(m.get("content", "")) for m in body.get("messages", []) if m.get("role") == "user"]
        else:
            self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        api_key = self.headers.get("api-key")
        authorization = self.headers.get("Authorization") or (f"api-key {api_key}" if api_key else None)
        fault, wait, rate_headers = self.fake._arrive(texts, authorization, self.path)
        status = None
        try:
            status = self._answer(body, texts, fault, wait, rate_headers)
        finally:
            self.fake._leave(status, texts)

    # -- answers ------------------------------------------------------------------------------
    def _answer(self, body: dict, texts: list[str], fault: str, wait: float | None, rate_headers: dict) -> int | None:
        if fault == RATE_LIMIT:
            return self._send_rate_limited(wait if wait is not None else self.fake.retry_after_s, rate_headers)
        if fault == HANG:
            self.fake._pause(self.fake.hang_seconds)
            return self._drop()
        self.fake._pause(self.fake.latency_s)
        if fault == DROP:
            return self._drop()
        if fault in (SERVER_ERROR, UNAVAILABLE):
            status = 500 if fault == SERVER_ERROR else 503
            return self._send_json(status, {"error": {"message": "the server had an error", "type": "server_error"}})
        if fault == BAD_REQUEST:
            return self._send_json(400, {"error": {"message": "invalid input", "type": "invalid_request_error"}})
        if self.fake.reject_base64 and body.get("encoding_format") == "base64":
            message = "encoding_format: only 'float' is supported"
            return self._send_json(400, {"error": {"message": message, "type": "invalid_request_error"}})
        if self.fake.api_key is not None and self.headers.get("Authorization") != f"Bearer {self.fake.api_key}":
            message = "Incorrect API key provided: sk-...redacted"
            return self._send_json(401, {"error": {"message": message, "type": "invalid_request_error"}})
        if self.fake.models is not None and body.get("model") not in self.fake.models:
            message = f"The model `{body.get('model')}` does not exist or you do not have access to it."
            return self._send_json(404, {"error": {"message": message, "type": "invalid_request_error",
                                                   "code": "model_not_found"}})
        if fault in (UNAUTHORIZED, ECHO_AUTH):
            shown = self.headers.get("Authorization", "") if fault == ECHO_AUTH else "sk-...redacted"
            message = f"Incorrect API key provided: {shown}"
            return self._send_json(401, {"error": {"message": message, "type": "invalid_request_error"}})
        if self.path.split("?", 1)[0].rstrip("/").endswith("/chat/completions"):
            return self._send_chat(body, texts, fault, rate_headers)
        return self._send_embeddings(body, texts, fault, rate_headers)

    def _send_rate_limited(self, wait: float, rate_headers: dict) -> int:
        headers = dict(rate_headers)
        if self.fake.retry_after_headers in ("seconds", "both"):
            headers["Retry-After"] = str(max(1, math.ceil(wait)))  # HTTP allows whole seconds only
        if self.fake.retry_after_headers in ("ms", "both"):
            headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
        error = {"error": {"message": "Rate limit reached for requests", "type": "requests", "code": "rate_limit_exceeded"}}
        return self._send_json(429, error, headers)

    def _send_embeddings(self, body: dict, texts: list[str], fault: str, rate_headers: dict) -> int:
        dimensions = int(body.get("dimensions") or self.fake.default_dimensions)
        use_base64 = body.get("encoding_format") == "base64"
        poisoned_nan = {m for m, f in self.fake.poison.items() if f == NAN}
        data = []
        for index, text in enumerate(texts):
            vector = expected_vector(text, dimensions + (1 if fault == WRONG_DIMS else 0))
            if any(marker in text for marker in poisoned_nan):
                vector = np.full_like(vector, np.nan)
            encoded = base64.b64encode(vector.tobytes()).decode("ascii") if use_base64 else vector.tolist()
            data.append({"object": "embedding", "index": 0 if fault == DUPLICATE_INDEX else index, "embedding": encoded})
        if fault == SHORT:
            data = data[:-1]
        if fault == WRONG_ORDER:
            data.reverse()
        tokens = sum(max(1, len(text) // 4) for text in texts)
        payload = {
            "object": "list",
            "data": data,
            "model": body.get("model", "fake"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        if fault == MALFORMED_JSON:
            return self._send_raw(200, json.dumps(payload)[: 40 + len(payload["data"]) % 7].encode(), rate_headers)
        return self._send_json(200, payload, rate_headers)

    def _send_chat(self, body: dict, texts: list[str], fault: str, rate_headers: dict) -> int:
        last = texts[-1] if texts else ""
        content = self.fake.chat_content(texts) if self.fake.chat_content else json.dumps({"summary": last[:40], "length": len(last)})
        if fault == MALFORMED_JSON:
            content = "Sure! Here is the JSON: {'summary': "
        tokens = max(1, len(last) // 4)
        payload = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": tokens, "completion_tokens": 10, "total_tokens": tokens + 10},
        }
        return self._send_json(200, payload, rate_headers)

    # -- plumbing -----------------------------------------------------------------------------
    def _send_json(self, status: int, payload: dict, headers: dict | None = None) -> int:
        return self._send_raw(status, json.dumps(payload).encode(), headers)

    def _send_raw(self, status: int, raw: bytes, headers: dict | None = None) -> int:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.send_header("x-request-id", f"req_{self.fake.stats.requests}")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(raw)
        return status

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return None


FakeOpenAIServer.handler_class = _FakeOpenAIHandler


def _as_list(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]  # type: ignore[union-attr]


@contextmanager
def in_own_process(latency: float = 0.0, rate_limit: float | None = None, burst: float | None = None,
                   transient_rate: float = 0.0, dimensions: int = 384) -> Iterator[str]:
    """A server in a process of its own (its arrivals are not judged by the caller's GIL); yields
    its base URL. Its counters come from `stats_of(base_url)`."""
    command = [sys.executable, "-m", "tests.fake_openai_server", "--latency", str(latency),
               "--transient-rate", str(transient_rate), "--dimensions", str(dimensions)]
    command += ["--rate-limit", str(rate_limit)] if rate_limit else []
    command += ["--burst", str(burst)] if burst else []
    root = Path(__file__).resolve().parents[1]
    server = subprocess.Popen(command, cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                              stdout=subprocess.PIPE, text=True)
    try:
        base_url = server.stdout.readline().strip()  # type: ignore[union-attr]
        if not base_url.startswith("http"):
            raise RuntimeError("the fake server did not start")
        yield base_url
    finally:
        # SIGKILL: a test worker's process can hand its children SIGTERM ignored or blocked (a CI
        # run waited 10 s for a terminated server here), and the fake server has nothing to flush.
        server.kill()
        server.wait(10)


def stats_of(base_url: str, reset: bool = False) -> dict:
    """The counters of a server in another process (`in_own_process`); `reset`: then zero them."""
    root = base_url.removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/{'_reset' if reset else '_stats'}", timeout=5) as response:
        return json.load(response)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0 = any free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--rate-limit", type=float, default=None, help="requests per second")
    parser.add_argument("--burst", type=float, default=None, help="token-bucket capacity (default rate/10)")
    parser.add_argument("--transient-rate", type=float, default=0.0, help="share of requests that fail")
    parser.add_argument("--dimensions", type=int, default=384, help="vector size when a request names none")
    args = parser.parse_args()
    # A gateway stamps arrivals as they come; here a handler thread waits for the GIL while others
    # encode answers, up to the 5 ms switch interval: arrivals would be judged by that noise.
    sys.setswitchinterval(0.0002)
    server = FakeOpenAIServer(
        latency_s=args.latency,
        rate_limit_rps=args.rate_limit,
        burst=args.burst,
        transient_rate=args.transient_rate,
        default_dimensions=args.dimensions,
        port=args.port,
    )
    with server:
        print(server.base_url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
