"""A local stand-in for RunPod's GraphQL API: a real HTTP server on 127.0.0.1 that the RunPod SDK talks to.

Point the SDK at it with ``RUNPOD_API_BASE_URL=stub.url``. The stub parses every query with graphql-core
(a syntax error is answered like the real API, with ``errors``), answers ``gpuTypes``,
``podFindAndDeployOnDemand``, ``pod``, ``myself { pods }`` and ``podTerminate``, and records every request
(path, headers, body, operation, parsed input) so tests can assert what reached the API.

Failure modes (``faults``): ``create_error`` (GraphQL error, no pod made), ``create_lost`` (pod made, the
connection drops before the reply), ``pod_error`` (every ``pod`` query errors), ``pod_lost`` (every ``pod``
query drops the connection), ``never_running`` (the pod never gets a runtime/SSH port), and
``terminate_errors=N`` (the first N ``podTerminate`` calls error), ``create_delay=S`` (the create request
takes S seconds before the pod exists and the reply is sent), ``pod_delay=S`` (every ``pod`` query takes S s).

Like RunPod, every pod gets ``RUNPOD_POD_ID`` and a pod-scoped ``RUNPOD_API_KEY`` (``platform_env``): that
key is accepted only for ``pod`` and ``podTerminate`` of its own pod (401 for anything else).
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from graphql import GraphQLSyntaxError, OperationDefinitionNode, parse, value_from_ast_untyped

__all__ = ["GPUS", "RecordedRequest", "RunPodStub"]

GPUS = {
    "NVIDIA GeForce RTX 4090": {"displayName": "RTX 4090", "securePrice": 0.69, "communityPrice": 0.34, "lowest": 0.34},
    "NVIDIA A100 80GB PCIe": {"displayName": "A100 PCIe", "securePrice": 1.64, "communityPrice": 1.19, "lowest": 1.19},
}


@dataclass
class RecordedRequest:
    """One request as it reached the stub."""

    path: str
    headers: dict[str, str]
    body: str
    operation: str | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    syntax_error: str | None = None
    pod_scoped: bool = False


class RunPodStub:
    """Threaded GraphQL stub; use as a context manager (always shut down).

    Args:
        api_key: the only key accepted (``Authorization: Bearer <key>``), else HTTP 401.
        start_polls: ``pod`` queries answered without a runtime before the pod shows its SSH port.
        ssh_port: public port reported for the pod's port 22.
        faults: failure modes (see module docstring), e.g. ``{"pod_error": True}``.
    """

    def __init__(
        self, api_key: str, start_polls: int = 1, ssh_port: int = 22022, faults: dict[str, Any] | None = None
    ) -> None:
        self.api_key = api_key
        self.start_polls = start_polls
        self.ssh_port = ssh_port
        self.faults = dict(faults or {})
        self.requests: list[RecordedRequest] = []
        self.pods: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----- lifecycle ----------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "stub not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> RunPodStub:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                stub._handle(self)

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # ----- queries for tests --------------------------------------------------------------
    def ops(self, name: str | None = None) -> list[RecordedRequest]:
        """Recorded requests, optionally only those of one operation."""
        with self._lock:
            return [r for r in self.requests if name is None or r.operation == name]

    def platform_env(self, pod_id: str) -> dict[str, str]:
        """What RunPod itself sets in the pod: its id and a key scoped to it."""
        return {"RUNPOD_POD_ID": pod_id, "RUNPOD_API_KEY": f"pod-scoped-{pod_id}-key"}

    def _pod_of_key(self, key: str) -> str | None:
        with self._lock:
            return next((pid for pid in self.pods if self.platform_env(pid)["RUNPOD_API_KEY"] == key), None)

    def alive(self) -> list[str]:
        """Ids of pods not terminated."""
        with self._lock:
            return [pid for pid, pod in self.pods.items() if pod["desiredStatus"] != "TERMINATED"]

    # ----- request handling ---------------------------------------------------------------
    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length", 0))).decode()
        record = RecordedRequest(handler.path, dict(handler.headers.items()), body)
        with self._lock:
            self.requests.append(record)
        auth = handler.headers.get("Authorization", "")
        scoped_pod = self._pod_of_key(auth.removeprefix("Bearer "))
        if auth != f"Bearer {self.api_key}" and scoped_pod is None:
            return self._reply(handler, 401, {"errors": [{"message": "Unauthorized"}]})
        try:
            query = json.loads(body)["query"]
            document = parse(query)
        except GraphQLSyntaxError as err:
            record.syntax_error = err.message
            return self._reply(handler, 400, {"errors": [{"message": f"Syntax Error: {err.message}"}]})
        operation = next(d for d in document.definitions if isinstance(d, OperationDefinitionNode))
        top = operation.selection_set.selections[0]
        record.operation = top.name.value
        record.arguments = {a.name.value: value_from_ast_untyped(a.value) for a in top.arguments or []}
        record.pod_scoped = scoped_pod is not None
        if scoped_pod is not None:  # a pod's own key: only its own pod
            target = (record.arguments.get("input") or {}).get("podId")
            if record.operation not in ("pod", "podTerminate") or target != scoped_pod:
                return self._reply(handler, 401, {"errors": [{"message": "Unauthorized (pod-scoped key)"}]})
        answer = getattr(self, f"_op_{record.operation}", None)
        if answer is None:
            return self._reply(handler, 400, {"errors": [{"message": f"stub: unknown operation {record.operation}"}]})
        result = answer(record.arguments.get("input") or {}, operation)
        if result == "drop":
            # a lost connection: close the socket without any reply
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return None
        if isinstance(result, str):
            return self._reply(handler, 200, {"errors": [{"message": result}]})
        return self._reply(handler, 200, {"data": {record.operation: result}})

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, code: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        try:
            handler.send_response(code)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting (an interrupted create): the pod exists all the same

    # ----- operations: return data, an error message (str) or "drop" -------------------------
    def _op_gpuTypes(self, args: dict[str, Any], operation: Any) -> Any:  # noqa: N802 (GraphQL name)
        ids = [args["id"]] if "id" in args else list(GPUS)
        return [
            {
                "id": gid,
                "displayName": GPUS[gid]["displayName"],
                "memoryInGb": 24,
                "securePrice": GPUS[gid]["securePrice"],
                "communityPrice": GPUS[gid]["communityPrice"],
                "lowestPrice": {"minimumBidPrice": 0.2, "uninterruptablePrice": GPUS[gid]["lowest"]},
            }
            for gid in ids
            if gid in GPUS
        ]

    def _op_podFindAndDeployOnDemand(self, args: dict[str, Any], operation: Any) -> Any:  # noqa: N802
        if self.faults.get("create_error"):
            return "There are no longer any instances available with the requested specifications."
        time.sleep(self.faults.get("create_delay", 0))
        pod_id = f"stubpod{next(self._ids)}"
        env = {item["key"]: item["value"] for item in args.get("env") or []}
        with self._lock:
            self.pods[pod_id] = {"input": args, "desiredStatus": "RUNNING", "polls": 0, "env": env}
        if self.faults.get("create_lost"):
            return "drop"
        return {
            "id": pod_id,
            "imageName": args.get("imageName"),
            "env": [f"{k}={v}" for k, v in env.items()],  # the real API echoes env values
            "machineId": "stubmachine",
            "machine": {"podHostId": f"{pod_id}-host"},
        }

    def _op_pod(self, args: dict[str, Any], operation: Any) -> Any:
        time.sleep(self.faults.get("pod_delay", 0))
        if self.faults.get("pod_error"):
            return "Something went wrong. Please try again later."
        if self.faults.get("pod_lost"):
            return "drop"
        with self._lock:
            pod = self.pods.get(args.get("podId", ""))
            if pod is None or pod["desiredStatus"] == "TERMINATED":
                return None
            pod["polls"] += 1
            started = pod["polls"] > self.start_polls and not self.faults.get("never_running")
            return self._pod_view(args["podId"], pod, started)

    def _pod_view(self, pod_id: str, pod: dict[str, Any], started: bool) -> dict[str, Any]:
        ports = [{"ip": "127.0.0.1", "isIpPublic": True, "privatePort": 22, "publicPort": self.ssh_port, "type": "tcp"}]
        return {
            "id": pod_id,
            "name": pod["input"].get("name"),
            "desiredStatus": pod["desiredStatus"],
            "costPerHr": GPUS.get(pod["input"].get("gpuTypeId"), {}).get("securePrice", 0.0),
            "env": [f"{k}={v}" for k, v in pod["env"].items()],
            "imageName": pod["input"].get("imageName"),
            "uptimeSeconds": 10 * pod["polls"],
            "runtime": {"ports": ports} if started else None,
            "machine": {"gpuDisplayName": "RTX 4090"},
        }

    def _op_myself(self, args: dict[str, Any], operation: Any) -> Any:
        with self._lock:
            pods = [self._pod_view(pid, pod, False) for pid, pod in self.pods.items()]
        return {"pods": [p for p in pods if p["desiredStatus"] != "TERMINATED"]}

    def _op_podTerminate(self, args: dict[str, Any], operation: Any) -> Any:  # noqa: N802
        if self.faults.get("terminate_errors", 0) > 0:
            self.faults["terminate_errors"] -= 1
            return "Something went wrong. Please try again later."
        with self._lock:
            pod = self.pods.get(args.get("podId", ""))
            if pod is None:
                return f"pod {args.get('podId')} not found"
            pod["desiredStatus"] = "TERMINATED"
        return None
