"""A preloaded Python for the suite's command lines: MONAI, torch, ignite and cbvae_ext imported once.

Every ``python -m monai.bundle ...`` the suite starts spends 7-14 s of a 2-core machine (by machine) importing MONAI
(``import monai`` loads all of its submodules) before it does anything; the suite starts dozens. This server
imports them once, then runs each command line in a child forked from it: the same ``__main__`` code as
``python -m``, in its own process with its own environment, folder, stdin/stdout/stderr and exit status, minus
the import. It never runs a torch operation itself, so no OpenMP thread pool exists yet when it forks.

The client is ``run`` (used by ``conftest.run_python``); ``CBVAE_TEST_PRELOAD=0`` makes it start a fresh
interpreter instead. Protocol, over a Unix socket: the client sends one JSON request with its stdin, stdout and
stderr as file descriptors; the server answers with the child's pid, then its exit status, one line each.
"""

from __future__ import annotations

import array
import json
import os
import runpy
import select
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["Child", "PreloadServer", "run"]

#: Modules the bundle commands import; nothing here may run a torch operation.
PRELOAD = (
    "torch",
    "monai",
    "monai.bundle",
    "monai.engines",
    "ignite",
    "fire",
    "cbvae_ext.engine",
    "cbvae_ext.engine.bundle_glue",
    "cbvae_ext.engine.tracking",
    "cbvae_ext.evaluation",
)
#: Variables read once, when a library loads (OpenMP's and torch's thread settings): a request whose values
#: differ from the server's cannot be served by a fork of it and gets a fresh interpreter.
IMPORT_TIME_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "PYTHONPATH")


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    fds = array.array("i")
    data, ancdata, _, _ = conn.recvmsg(1 << 20, socket.CMSG_LEN(3 * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    return json.loads(data.decode()), list(fds)


def _serve(path: str) -> tuple[dict, list[int]] | None:
    """Accept requests until told to stop; in a forked child, return its request (the parent never returns one)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    parent = os.getppid()
    while os.getppid() == parent:  # a server whose test process died stops
        for _ in selector.select(timeout=0.05):
            conn, _ = listener.accept()
            request, fds = _recv_request(conn)
            if request.get("stop"):
                return None
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                return request, fds
            for fd in fds:
                os.close(fd)
            conn.sendall(f"{pid}\n".encode())
            children[pid] = conn
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                conn = children.pop(pid)
                try:
                    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:
                    pass  # the client gave up (its timeout)
                conn.close()
    return None


def _run_child(request: dict, fds: list[int]) -> int:
    """In the forked child: become the requested command (folder, environment, standard streams, argv) and run it."""
    for fd, target in zip(fds, (0, 1, 2), strict=True):
        os.dup2(fd, target)
        os.close(fd)
    os.setsid()  # its own process group, like a fresh process the client can signal as a whole
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = request["args"]
    # sys.path[0] as a fresh interpreter sets it: the folder for -m, the script's folder for a script
    sys.path[0] = os.getcwd() if args[0] == "-m" else os.path.dirname(os.path.abspath(args[0]))
    try:
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(args)
            runpy.run_path(args[0], run_name="__main__")
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    return 0


class Child:
    """A command running in a child of the server: its ``pid``, and ``returncode`` once ``wait`` returns."""

    def __init__(self, args: list[str], conn: socket.socket) -> None:
        self.args = args
        self._conn = conn
        self._buffer = b""
        self.pid = int(self._line(None))
        self.returncode: int | None = None

    def _line(self, timeout: float | None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._conn], [], [], left)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            data = self._conn.recv(4096)
            if not data:
                raise RuntimeError("the preload server closed the connection (did it die?)")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def wait(self, timeout: float | None = None) -> int:
        """The exit status (negative: killed by that signal), as ``subprocess.Popen.wait``."""
        if self.returncode is None:
            self.returncode = int(self._line(timeout))
            self._conn.close()
        return self.returncode

    def poll(self) -> int | None:
        try:
            return self.wait(0)
        except subprocess.TimeoutExpired:
            return None


class PreloadServer:
    """One server process (started on first use, stopped by ``close``) with the environment it was started in."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env = dict(env)
        self.cwd = cwd
        self.path = os.path.join(tempfile.mkdtemp(prefix="cbvae-preload-"), "socket")
        self.proc: subprocess.Popen | None = None
        self._lock = threading.Lock()  # tests send commands from several threads at once

    def _start(self) -> None:
        if os.path.exists(self.path):  # left by a server that died
            os.unlink(self.path)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, self.path], cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, text=True
        )
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the preload server did not start (status {self.proc.wait()})")

    def serves(self, env: dict[str, str]) -> bool:
        return os.environ.get("CBVAE_TEST_PRELOAD", "1") != "0" and all(
            env.get(k) == self.env.get(k) for k in IMPORT_TIME_ENV
        )

    def popen(self, args: list[str], env: dict[str, str], cwd: Path, stdout: int, stderr: int) -> Child:
        """Start ``python *args`` through the server (``subprocess.Popen`` with these file descriptors)."""
        with self._lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.path)
        with open(os.devnull, "rb") as null:
            fds = array.array("i", [null.fileno(), stdout, stderr])
            request = json.dumps({"args": list(args), "env": env, "cwd": str(cwd)}).encode()
            conn.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        return Child(args, conn)

    def run(self, args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        """``subprocess.run([python, *args], capture_output=True, text=True)`` through the server."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            child = self.popen(args, env, cwd, out.fileno(), err.fileno())
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                raise
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(
                args, child.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace")
            )

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.connect(self.path)
                conn.sendmsg([b'{"stop": true}'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0]))])
            self.proc.wait(timeout=30)


def run(
    server: PreloadServer | None, args: list[str], env: dict[str, str], cwd: Path, timeout: float
) -> subprocess.CompletedProcess:
    """Run ``python *args`` through ``server`` when it can serve ``env``, else in a fresh interpreter."""
    if server is not None and server.serves(env):
        return server.run(args, env, cwd, timeout)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


if __name__ == "__main__":
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    child = _serve(sys.argv[1])
    if child is None:
        sys.exit(0)
    sys.exit(_run_child(*child))
