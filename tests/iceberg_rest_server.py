"""An Iceberg REST catalog on 127.0.0.1 for the tests: the REST protocol's namespace and table
endpoints, served over a real pyiceberg SQL catalog (PostgreSQL in the tests), so that the
lakehouse's REST client (`Lakehouse(rest_uri=...)`) is tested against the protocol it speaks in
production (Polaris, Nessie, Glue's or Unity's REST endpoints).

What a REST catalog does server-side is what this does: it answers loads with the metadata
location, writes the new metadata file on a commit and swaps the pointer only if the commit's
requirements still hold (409 otherwise, which the client retries). Data and manifest files are
written by the client. `token`: when set, every request must carry it as a bearer token (401).
Faults can be injected, one per commit, in order (`commit_faults`): "refuse" answers 503 and
commits nothing; "lose_answer" commits, then answers 504 as a gateway that timed out would.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

NAMESPACE_SEPARATOR = "\x1f"  # multi-level namespaces in a path (the REST spec's unit separator)


class IcebergRestServer:
    def __init__(self, catalog_options: dict[str, str], token: str | None = None):
        self.catalog_options = catalog_options
        self.token = token
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.commit_faults: list[str] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def uri(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> IcebergRestServer:
        from pyiceberg.catalog.sql import SqlCatalog

        self.catalog = SqlCatalog("rest-backend", **self.catalog_options)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def take_commit_fault(self) -> str | None:
        with self._lock:
            return self.commit_faults.pop(0) if self.commit_faults else None


class _Named:
    """What SqlCatalog.commit_table reads of the table it commits to: its name."""

    def __init__(self, identifier: tuple[str, ...]):
        self.identifier = identifier

    def name(self) -> tuple[str, ...]:
        return self.identifier


def _handler_for(server: IcebergRestServer):
    from pyiceberg.catalog.rest import CreateTableRequest, TableResponse
    from pyiceberg.exceptions import (
        CommitFailedException,
        NamespaceAlreadyExistsError,
        NoSuchNamespaceError,
        NoSuchTableError,
        TableAlreadyExistsError,
    )
    from pyiceberg.table import CommitTableRequest

    catalog = server.catalog
    status_of = {NoSuchTableError: 404, NoSuchNamespaceError: 404, TableAlreadyExistsError: 409,
                 NamespaceAlreadyExistsError: 409, CommitFailedException: 409}

    def load(identifier: tuple[str, ...]) -> str:
        table = catalog.load_table(identifier)
        return TableResponse(metadata_location=table.metadata_location, metadata=table.metadata).model_dump_json()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet test output
            pass

        def do_GET(self) -> None:
            self._serve("GET")

        def do_HEAD(self) -> None:
            self._serve("HEAD")

        def do_POST(self) -> None:
            self._serve("POST")

        def do_DELETE(self) -> None:
            self._serve("DELETE")

        def _serve(self, method: str) -> None:
            path = urlsplit(self.path).path
            server.requests.append((method, path))
            if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                return self._error(401, "NotAuthorizedException", "a valid bearer token is required")
            parts = [unquote(p) for p in path.strip("/").split("/")]
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                status, answer = self._route(method, parts, body)
            except tuple(status_of) as exc:
                return self._error(status_of[type(exc)], type(exc).__name__, str(exc))
            except Exception as exc:  # a server error: the client must not guess the outcome
                return self._error(500, type(exc).__name__, str(exc))
            self._send(status, answer)

        def _route(self, method: str, parts: list[str], body: bytes) -> tuple[int, str | None]:
            if parts[:1] != ["v1"]:
                return 404, None
            parts = parts[1:]
            if parts == ["config"]:
                return 200, json.dumps({"defaults": {}, "overrides": {}})
            if parts[:1] != ["namespaces"]:
                return 404, None
            if len(parts) == 1:
                if method == "POST":
                    request = json.loads(body)
                    catalog.create_namespace(tuple(request["namespace"]), request.get("properties") or {})
                    return 200, json.dumps(request)
                return 200, json.dumps({"namespaces": [list(n) for n in catalog.list_namespaces()]})
            namespace = tuple(parts[1].split(NAMESPACE_SEPARATOR))
            if len(parts) == 2:
                if method == "DELETE":
                    catalog.drop_namespace(namespace)
                    return 204, None
                properties = catalog.load_namespace_properties(namespace)
                return (204, None) if method == "HEAD" else (200, json.dumps(
                    {"namespace": list(namespace), "properties": properties}))
            if parts[2] != "tables":
                return 404, None
            if len(parts) == 3:
                if method == "POST":
                    # pyiceberg leaves out a location it does not set (the table's default then)
                    request = CreateTableRequest.model_validate({"location": None, **json.loads(body)})
                    return 200, self._create(namespace, request)
                tables = [{"namespace": list(t[:-1]), "name": t[-1]} for t in catalog.list_tables(namespace)]
                return 200, json.dumps({"identifiers": tables})
            identifier = (*namespace, parts[3])
            if method == "HEAD":
                return (204 if catalog.table_exists(identifier) else 404), None
            if method == "DELETE":
                catalog.drop_table(identifier)
                return 204, None
            if method == "POST":
                fault = server.take_commit_fault()
                if fault == "refuse":
                    return 503, _error_body(503, "ServiceUnavailableException", "injected: refused")
                request = CommitTableRequest.model_validate_json(body)
                committed = catalog.commit_table(_Named(identifier), request.requirements, request.updates)
                if fault == "lose_answer":
                    return 504, _error_body(504, "GatewayTimeout", "injected: committed, answer lost")
                return 200, committed.model_dump_json()
            return 200, load(identifier)

        def _create(self, namespace: tuple[str, ...], request) -> str:
            identifier = (*namespace, request.name)
            options: dict[str, Any] = {"schema": request.table_schema, "location": request.location,
                                       "properties": request.properties}
            if request.partition_spec is not None:
                options["partition_spec"] = request.partition_spec
            if request.write_order is not None:
                options["sort_order"] = request.write_order
            if not request.stage_create:
                catalog.create_table(identifier, **options)
                return load(identifier)
            if catalog.table_exists(identifier):
                raise TableAlreadyExistsError(f"Table already exists: {'.'.join(identifier)}")
            # staged: the client commits the table's first metadata later (AssertCreate)
            staged = catalog._create_staged_table(identifier, **options)
            return TableResponse(metadata_location=None, metadata=staged.metadata).model_dump_json()

        def _error(self, status: int, kind: str, message: str) -> None:
            self._send(status, _error_body(status, kind, message))

        def _send(self, status: int, answer: str | None) -> None:
            data = (answer or "").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data and self.command != "HEAD":
                self.wfile.write(data)

    return Handler


def _error_body(status: int, kind: str, message: str) -> str:
    return json.dumps({"error": {"message": message, "type": kind, "code": status}})
