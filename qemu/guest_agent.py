"""Guest command agent: runs shell commands sent by the host over a serial line (qemu/launch.py Vm).

Runs inside the VM on the guest tree's python3 (stdlib only), started by guest_init.sh.
Protocol: one JSON object per line in each direction, on a raw serial device.
  guest → host  {"event": "ready", "nonce": N}                                once, at start
  host → guest  {"id": I, "cmd": "shell command", "timeout": seconds}
  guest → host  {"id": I, "exit_code": C, "output": base64, "seconds": S, "timed_out": bool}
  host → guest  {"id": I, "op": "exit"}  → reply {"id": I, "exit_code": 0, ...} and stop
A line that is not a valid request gets {"id": null, "error": "..."} and the agent keeps serving.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import termios
import time
import tty

# Longest request line accepted; a command is a shell string, not a payload.
MAX_REQUEST_BYTES = 1 << 20
DEFAULT_TIMEOUT_S = 300.0


def run_command(cmd: str, timeout: float) -> dict:
    start = time.monotonic()
    timed_out = False
    # Own session, so a timeout kills the command's children too.
    try:
        process = subprocess.Popen(
            ["/bin/sh", "-c", cmd],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:  # e.g. E2BIG for a command over ARG_MAX: answer it, keep serving
        message = f"guest agent: cannot start the command: {exc}\n".encode()
        return {"exit_code": 126, "output": base64.b64encode(message).decode("ascii"),
                "seconds": round(time.monotonic() - start, 3), "timed_out": False}
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, 9)
        output, _ = process.communicate()
    return {
        "exit_code": process.returncode,
        "output": base64.b64encode(output).decode("ascii"),
        "seconds": round(time.monotonic() - start, 3),
        "timed_out": timed_out,
    }


def handle(line: bytes) -> tuple[dict, bool]:
    """Reply for one request line, and whether to keep serving."""
    try:
        request = json.loads(line)
        if not isinstance(request, dict):
            raise ValueError("request is not an object")
    except ValueError as exc:
        return {"id": None, "error": f"bad request: {exc}"}, True
    ident = request.get("id")
    if request.get("op") == "exit":
        return {"id": ident, "exit_code": 0, "output": "", "seconds": 0.0, "timed_out": False}, False
    cmd = request.get("cmd")
    timeout = request.get("timeout", DEFAULT_TIMEOUT_S)
    if not isinstance(cmd, str) or not isinstance(timeout, (int, float)) or timeout <= 0:
        return {"id": ident, "error": "request needs a string 'cmd' and a positive 'timeout'"}, True
    return {"id": ident, **run_command(cmd, float(timeout))}, True


def serve(device: str, nonce: str) -> None:
    fd = os.open(device, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd)
    attrs = termios.tcgetattr(fd)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    termios.tcflush(fd, termios.TCIOFLUSH)

    def send(message: dict) -> None:
        data = json.dumps(message).encode() + b"\n"
        while data:
            data = data[os.write(fd, data) :]

    send({"event": "ready", "nonce": nonce})
    buffer = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            time.sleep(0.05)
            continue
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if not line.strip():
                continue
            reply, keep_going = handle(line)
            send(reply)
            if not keep_going:
                return
        if len(buffer) > MAX_REQUEST_BYTES:
            buffer = b""
            send({"id": None, "error": "request line too long"})


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "none")
