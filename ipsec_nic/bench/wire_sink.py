"""The far end of the card's wire for the kernel-driver packets/s bench: a host process, not the guest.

The card's ``dgram`` wire (device/nic/wire.py) sends each Ethernet frame as one datagram to a UNIX socket
path. Bound by this process instead of QEMU's ``-netdev dgram``, the frames the card transmits never
reach the guest again, so the guest's vCPU does only the sender's work (ipsec_nic/bench/kernel_pps.py).

    python -m ipsec_nic.bench.wire_sink SOCKET_PATH

Control is one JSON object per line on stdin, one answer per line on stdout:

- ``{"cmd": "expect", ...}``: the flow to check (FlowSpec.to_json; ESP keys travel on this pipe only,
  never in argv or a log);
- ``{"cmd": "take"}``: read what is still queued, wait until the wire has been quiet for ``quiet_s``,
  check every frame received since the previous take and answer with the Tally, then start afresh;
- ``{"cmd": "quit"}``.

Counting is exact: an AF_UNIX datagram socket never drops what it has accepted; a sender finds the
receiver's queue full and gets EAGAIN, and the card's wire then holds the frame and retries (up to
device/nic/wire.py DGRAM_TX_QUEUE frames; one it cannot hold is completed to the driver but not sent, and
shows as the driver's `tx_ok` minus the card's `card_tx_packets`, which kernel_pps.py reports). After the
first frame the sink connects to the card's socket, which lifts the 10-datagram queue limit for it (see
serve). This process keeps every frame until the take (above MAX_KEPT frames per take it only counts the
rest, reported as ``unverified``). Checking waits for the take so that the decryption's CPU is not spent
while the guest sends.

What counts as a datagram of the flow (``Tally.plain`` / ``Tally.esp``): an Ethernet II frame to the
flow's MAC, IPv4 without options from the flow's source to its destination with a correct header
checksum, and either plain UDP or ESP (RFC 4303) on the flow's SPI that authenticates and decrypts
under AES-GCM (RFC 4106: nonce = salt || IV, AAD = SPI || sequence number, §5) to UDP, with the ESP
trailer's padding bytes 1, 2, 3, ... (RFC 4303 §2.4) and next header 17. The UDP datagram must go to
the flow's port with the flow's payload (all zero bytes, as the bench's sender sends) and a checksum
that is either absent or right (RFC 768). Anything else addressed from the flow's source to its
destination is ``bad`` (with a reason); frames of other kinds (IPv6 neighbour discovery, ...) are
``other``. ESP sequence numbers seen twice in one take are ``replayed`` and not counted twice; an
explicit IV seen twice in one take under new sequence numbers is ``iv_reused`` and not counted at all:
RFC 4106 §3.1 forbids repeating an IV under one key (GCM then leaks the XOR of the plaintexts and the
authentication key), and the bench installs one SA per take. Who chose the IV does not matter to these
checks: under crypto offload the card writes it into the ESP header the guest built, under packet
offload the card builds the whole ESP packet, sequence number included; the sink reads both from the
frame and needs only the keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

MAX_FRAME = 65536
MAX_KEPT = 100_000  # frames kept for checking per take (~140 MB of 1.4 kB frames; a 3 s slice has ~10 k)
QUIET_S = 0.1  # a take waits until no frame came for this long
SOCKET_BUFFER = 4 << 20
ETH_P_IP = 0x0800
IPPROTO_UDP, IPPROTO_ESP = 17, 50
GCM_IV, GCM_ICV = 8, 16  # RFC 4106 §3.1 (explicit IV) and the 16-byte ICV the bench's SA uses
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_ESP = struct.Struct("!II")


@dataclasses.dataclass(frozen=True)
class EspKey:
    """AES-GCM key of one outbound SA (RFC 4106 §8.1: the salt is the last 4 bytes of the keying material)."""

    spi: int
    key: bytes = dataclasses.field(repr=False)
    salt: bytes = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class FlowSpec:
    """What the guest's sender sends: IPv4/UDP from ``src`` to ``dst``:``dport`` with ``payload`` zero bytes,
    in frames to ``dst_mac``; under IPsec, ESP on ``esp.spi``."""

    src: str
    dst: str
    dport: int
    payload: int
    dst_mac: bytes
    esp: EspKey | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"src": self.src, "dst": self.dst, "dport": self.dport, "payload": self.payload,
                               "dst_mac": self.dst_mac.hex()}
        if self.esp is not None:
            out["esp"] = {"spi": self.esp.spi, "key": self.esp.key.hex(), "salt": self.esp.salt.hex()}
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FlowSpec:
        esp = d.get("esp")
        return cls(d["src"], d["dst"], int(d["dport"]), int(d["payload"]), bytes.fromhex(d["dst_mac"]),
                   EspKey(int(esp["spi"]), bytes.fromhex(esp["key"]), bytes.fromhex(esp["salt"])) if esp else None)


@dataclasses.dataclass
class Tally:
    """Frames of one take (see the module docstring for what each count means)."""

    frames: int = 0
    plain: int = 0
    esp: int = 0
    replayed: int = 0
    iv_reused: int = 0
    bad: int = 0
    other: int = 0
    unverified: int = 0
    seq_min: int = 0
    seq_max: int = 0
    reasons: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def seq_gaps(self) -> int:
        """ESP sequence numbers inside [seq_min, seq_max] that never arrived (sent, lost before the sink)."""
        seen = self.esp + self.iv_reused  # distinct sequence numbers (an IV reuse is refused, not missing)
        return self.seq_max - self.seq_min + 1 - seen if seen else 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Tally:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _checksum(data: bytes) -> int:
    """RFC 1071 ones'-complement sum, folded (not inverted)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


class Checker:
    """Checks frames against one FlowSpec and tallies them."""

    def __init__(self, flow: FlowSpec) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.flow = flow
        self.src = socket.inet_aton(flow.src)
        self.dst = socket.inet_aton(flow.dst)
        self.zeros = bytes(flow.payload)
        self.aead = AESGCM(flow.esp.key) if flow.esp else None

    def tally(self, frames: list[bytes], seen: int | None = None) -> Tally:
        """``seen``: frames received in all (more than ``len(frames)`` when some were only counted)."""
        t = Tally(frames=len(frames) if seen is None else seen)
        t.unverified = t.frames - len(frames)
        reasons: Counter[str] = Counter()
        seqs: set[int] = set()
        ivs: set[bytes] = set()
        for frame in frames:
            kind, detail = self.check(frame)
            if kind == "plain":
                t.plain += 1
            elif kind == "esp":
                seq, iv = detail
                if seq in seqs:
                    t.replayed += 1
                    continue
                seqs.add(seq)
                if iv in ivs:
                    t.iv_reused += 1
                    continue
                ivs.add(iv)
                t.esp += 1
            elif kind == "other":
                t.other += 1
            else:
                t.bad += 1
                reasons[str(detail)] += 1
        if seqs:
            t.seq_min, t.seq_max = min(seqs), max(seqs)
        t.reasons = dict(reasons)
        return t

    def check(self, frame: bytes) -> tuple[str, Any]:
        """("plain", None), ("esp", (sequence number, IV)), ("other", None) or ("bad", reason)."""
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            return "other", None
        ver_ihl, _, total, _, _, _, proto, _, src, dst = _IPV4.unpack_from(frame, 14)
        if src != self.src or dst != self.dst:
            return "other", None
        if frame[:6] != self.flow.dst_mac:
            return "bad", "destination MAC"
        if ver_ihl != 0x45:
            return "bad", "IPv4 version/header length"
        if total != len(frame) - 14:
            return "bad", "IPv4 total length vs frame"
        if _checksum(frame[14:34]) != 0xFFFF:
            return "bad", "IPv4 header checksum"
        body = frame[34:]
        if proto == IPPROTO_UDP:
            why = self._udp(body)
            return ("plain", None) if why is None else ("bad", why)
        if proto == IPPROTO_ESP:
            return self._esp(body)
        return "bad", f"IP protocol {proto}"

    def _udp(self, udp: bytes) -> str | None:
        if len(udp) < 8:
            return "UDP header"
        _, dport, length, csum = _UDP.unpack_from(udp)
        if dport != self.flow.dport:
            return "UDP destination port"
        if length != len(udp) or length != 8 + self.flow.payload:
            return "UDP length"
        if udp[8:] != self.zeros:
            return "UDP payload"
        if csum:  # RFC 768: 0 = no checksum; otherwise over the pseudo-header + datagram
            pseudo = self.src + self.dst + struct.pack("!BBH", 0, IPPROTO_UDP, length)
            if _checksum(pseudo + udp) != 0xFFFF:
                return "UDP checksum"
        return None

    def _esp(self, esp: bytes) -> tuple[str, Any]:
        from cryptography.exceptions import InvalidTag

        key = self.flow.esp
        if key is None or self.aead is None:
            return "bad", "ESP on a flow without IPsec"
        if len(esp) < 8 + GCM_IV + GCM_ICV + 2:
            return "bad", "ESP too short"
        spi, seq = _ESP.unpack_from(esp)
        if spi != key.spi:
            return "bad", "ESP SPI"
        try:
            inner = self.aead.decrypt(key.salt + esp[8:16], esp[16:], esp[:8])
        except InvalidTag:
            return "bad", "ESP ICV (does not authenticate)"
        pad, nxt = inner[-2], inner[-1]
        if nxt != IPPROTO_UDP:
            return "bad", "ESP next header"
        if len(inner) < 2 + pad or inner[-2 - pad:-2] != bytes(range(1, pad + 1)):
            return "bad", "ESP padding"
        why = self._udp(inner[:-2 - pad])
        return ("esp", (seq, esp[8:16])) if why is None else ("bad", why)


# --- the process -------------------------------------------------------------------------------------------


def serve(path: str, control: TextIO, answers: TextIO, quiet_s: float = QUIET_S) -> None:
    """Bind ``path``, keep every frame, answer the control commands (module docstring) until quit or EOF."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock.bind(path)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    sock.setblocking(False)
    kept: list[bytes] = []
    seen = 0
    checker: Checker | None = None
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "wire")
    sel.register(control, selectors.EVENT_READ, "control")
    keep = kept.append
    connected = False

    def drain() -> int:
        nonlocal seen, connected
        n = 0
        while True:
            try:
                if connected:
                    frame = sock.recv(MAX_FRAME)
                else:
                    frame, sender = sock.recvfrom(MAX_FRAME)
                    if isinstance(sender, str) and sender:
                        # Connected to the card's socket, this one is exempt from net.unix.max_dgram_qlen
                        # (10 datagrams by default): net/unix/af_unix.c unix_dgram_sendmsg checks
                        # unix_recvq_full only when the receiver's peer is not the sender. The card's send
                        # buffer then absorbs the moments this process waits for a CPU.
                        with contextlib.suppress(OSError):
                            sock.connect(sender)
                            connected = True
            except (BlockingIOError, InterruptedError):
                seen += n
                return n
            n += 1
            if len(kept) < MAX_KEPT:
                keep(frame)

    def answer(value: dict[str, Any]) -> None:
        answers.write(json.dumps(value) + "\n")
        answers.flush()

    answer({"ready": path})
    try:
        while True:
            for key, _ in sel.select():
                if key.data == "wire":
                    drain()
                    continue
                line = control.readline()
                if not line:
                    return
                cmd = json.loads(line)
                if cmd.get("cmd") == "quit":
                    return
                if cmd.get("cmd") == "expect":
                    checker = Checker(FlowSpec.from_json(cmd["flow"]))
                    answer({"ok": True})
                elif cmd.get("cmd") == "take":
                    # Frames the card's wire still holds (EAGAIN) come within milliseconds; wait for quiet.
                    quiet_until = time.monotonic() + quiet_s
                    while time.monotonic() < quiet_until:
                        if drain():
                            quiet_until = time.monotonic() + quiet_s
                        time.sleep(0.005)
                    frames, total = kept[:], seen
                    kept.clear()
                    seen = 0
                    tally = checker.tally(frames, total) if checker else Tally(frames=total, other=total)
                    answer(tally.to_json())
                else:
                    answer({"error": f"unknown command {cmd!r}"})
    finally:
        sel.close()
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)


class WireSink:
    """The sink as a child process; a context manager. ``path`` is where the card's wire sends."""

    def __init__(self, path: Path, log: Path | None = None) -> None:
        self.path = Path(path)
        self.log = log
        self.process: subprocess.Popen[str] | None = None

    def __enter__(self) -> WireSink:
        err = open(self.log, "w") if self.log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen([sys.executable, "-m", "ipsec_nic.bench.wire_sink", str(self.path)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        if err is not subprocess.DEVNULL:
            err.close()
        ready = self._read()
        if "ready" not in ready:
            raise RuntimeError(f"the wire sink did not start: {ready}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        p = self.process
        if p is None:
            return
        with contextlib.suppress(OSError, ValueError):
            assert p.stdin is not None
            p.stdin.write('{"cmd": "quit"}\n')
            p.stdin.close()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        self.process = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def _read(self) -> dict[str, Any]:
        assert self.process is not None and self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the wire sink exited (status {self.process.poll()})")
        return json.loads(line)

    def _ask(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(json.dumps(cmd) + "\n")
        self.process.stdin.flush()
        value = self._read()
        if "error" in value:
            raise RuntimeError(f"wire sink: {value['error']}")
        return value

    def expect(self, flow: FlowSpec) -> None:
        self._ask({"cmd": "expect", "flow": flow.to_json()})

    def take(self) -> Tally:
        return Tally.from_json(self._ask({"cmd": "take"}))


if __name__ == "__main__":
    serve(sys.argv[1], sys.stdin, sys.stdout)
