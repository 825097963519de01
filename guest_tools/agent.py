"""The guest agent: one long-lived process that holds the card open so separate CLI processes share its SAs
in vfio mode.

Why: Linux vfio-pci resets the function when a process opens the device and again when the last user
closes it (drivers/vfio/pci/vfio_pci_core.c: ``vfio_pci_core_enable`` / ``vfio_pci_core_disable``), and the
card, true to PCIe, clears every SA on that FLR. So in vfio mode the CLI does not open the device itself:
it forwards its command line to this agent over a UNIX socket (``<state dir>/<bdf>.sock``, mode 0600, peers
must be the agent's own user, checked with SO_PEERCRED) and prints what the agent answers. The agent runs the
commands one at a time through one :class:`guest_tools.cli.Session` (the card opened once, RX ring armed).
``agent stop`` closes the device - the kernel resets the function then, and every SA is gone.

Protocol: one JSON object per connection each way. Request ``{"argv": [...], "stdin": "..."?}`` (a CLI
command line; ``stdin`` feeds ``session`` and ``--key-file -``) or ``{"control": "status" | "stop"}``; answer
``{"status": N, "stdout": "...", "stderr": "..."}``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

MAX_REQUEST = 1 << 20
START_TIMEOUT = 120.0  # seconds: under TCG the first python import and the device open take a while
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class AgentError(RuntimeError):
    """The agent cannot be reached or started."""


def state_dir() -> Path:
    return Path(os.environ.get("IPSEC_NIC_STATE_DIR", "/run/ipsec-nic"))


def socket_path(bdf: str) -> Path:
    return state_dir() / f"{bdf}.sock"


def _recv_all(conn: socket.socket) -> bytes:
    chunks, size = [], 0
    while True:
        data = conn.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)
        size += len(data)
        if size > MAX_REQUEST:
            raise ValueError("message too large")


class Agent:
    """Serves forwarded CLI command lines on ``path`` with one Session; ``run_one(session, argv) -> status``
    is the CLI's (injected: the CLI imports this module, not the other way round)."""

    def __init__(self, session, path: Path, run_one: Callable[[object, list[str]], int]) -> None:
        self.session = session
        self.run_one = run_one
        self.session.keep_receiving = True  # one card handle for every command, RX ring armed
        self.session.from_argv = False  # argv arrives over a 0600 socket, not visible in ps of this process
        self.path = path
        self.running = True

    def listen(self) -> socket.socket:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is created 0600
        try:
            server.bind(str(self.path))
        finally:
            os.umask(old)
        server.listen(8)
        return server

    def serve(self, server: socket.socket) -> None:
        try:
            while self.running:
                conn, _ = server.accept()
                with conn:
                    self.handle(conn)
        finally:
            server.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.session.close()

    def handle(self, conn: socket.socket) -> None:
        _, uid, _ = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        try:
            raw = _recv_all(conn)  # read first: answering before the client finished sending resets it
        except (OSError, ValueError):
            return
        if uid != os.geteuid():
            conn.sendall(json.dumps({"status": 1, "stdout": "", "stderr": f"error: agent refuses uid {uid}\n"})
                         .encode())
            return
        try:
            message = json.loads(raw)
            control = message.get("control")
            argv = None if control else [str(a) for a in message["argv"]]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            conn.sendall(json.dumps({"status": 2, "stdout": "", "stderr": f"usage error: bad request ({exc})\n"})
                         .encode())
            return
        answer = self.control(control) if control else self.run(argv, message.get("stdin"))
        conn.sendall(json.dumps(answer).encode())

    def control(self, what: str) -> dict:
        if what == "stop":
            self.session.close()  # before answering: the client may open the device right after
            self.running = False
            return {"status": 0, "stdout": f"agent {os.getpid()} stopped: the card is released and the kernel "
                    "resets the function, so every SA is gone\n", "stderr": ""}
        if what == "status":
            return {"status": 0, "stdout": f"agent {os.getpid()} holds the card, serving {self.path}\n",
                    "stderr": ""}
        return {"status": 2, "stdout": "", "stderr": f"usage error: unknown control {what!r}\n"}

    def run(self, argv: list[str], stdin: str | None = None) -> dict:
        out, err = io.StringIO(), io.StringIO()
        self.session.out = out
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            old_stdin = sys.stdin
            sys.stdin = io.StringIO(stdin or "")
            try:
                status = self.run_one(self.session, argv)
            finally:
                sys.stdin = old_stdin
        return {"status": status, "stdout": out.getvalue(), "stderr": err.getvalue()}


def request(path: Path, argv: list[str] | None = None, stdin: str | None = None, timeout: float | None = None,
            control: str | None = None) -> dict:
    """Send one command line (or a ``control`` word) to the agent at ``path``; its answer."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(timeout)
        conn.connect(str(path))
        message: dict = {"control": control} if control else {"argv": argv}
        if stdin is not None:
            message["stdin"] = stdin
        conn.sendall(json.dumps(message).encode())
        conn.shutdown(socket.SHUT_WR)
        return json.loads(_recv_all(conn))
    finally:
        conn.close()


def is_running(path: Path) -> bool:
    try:
        request(path, control="status", timeout=START_TIMEOUT)
        return True
    except OSError:
        return False


def ensure_running(bdf: str, irq: str, state: str | None) -> Path:
    """The socket of the agent for ``bdf``, starting one (detached, its log next to the socket) if none runs."""
    path = socket_path(bdf)
    if path.exists() and is_running(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "guest_tools.cli", "--no-agent", "--bdf", bdf, "--irq", irq]
    if state:
        argv += ["--state", state]
    argv += ["agent", "serve"]
    log = path.with_suffix(".agent.log")
    root = str(Path(__file__).resolve().parents[1])  # the checkout (read-only share in the VM)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))))
    with open(log, "ab") as log_file:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                start_new_session=True, cwd="/", env=env)
    print(f"note: started guest agent {proc.pid} holding {bdf} (vfio resets the function on every open; "
          f"the agent keeps the SAs; 'agent stop' releases the card)", file=sys.stderr)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AgentError(f"guest agent exited with status {proc.returncode}; see {log}")
        if path.exists() and is_running(path):
            return path
        time.sleep(0.2)
    raise AgentError(f"guest agent did not answer on {path} within {START_TIMEOUT:g} s; see {log}")
