"""Fuzz targets: each turns one input (bytes) into work on the real code and raises on a finding.

* ``vfio_user``: the vfio-user connection (parser, state machine, fd accounting) and the server's request
  handlers in front of the real card (default profile); the bytes arrive as a client would send them, in
  chunks, optionally with an eventfd or a guest-RAM memfd attached, after a proper VERSION or not, and
  optionally with the first bytes of guest RAM (descriptors): doorbells run ring work against that RAM.
* ``admin``: the firmware's admin command decoders through its public entry ``Firmware.execute`` (v1 ADD/
  DELETE, UDP-ESP, v2 lists, ADD_SA_EX, UPDATE, LIST/STATS ...).
* ``esp_rx``: the ESP/AH receive path ``Firmware.receive`` with inbound SAs of each kind (GCM, CBC+HMAC
  tunnel IPv6, AH, UDP-ESP, ESN): raw frames, and fuzzed inner packets sealed by the twin outbound SA so the
  decrypted trailer and inner headers are fuzzed too.

A finding is an exception out of the target or an ``log.exception`` record (the code logs an unexpected
exception it caught that way), an fd leaked across inputs (checked every ``FD_CHECK_EVERY`` inputs), or
whatever libFuzzer sees (timeouts, RSS over the limit).
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import struct
from collections.abc import Callable

FD_CHECK_EVERY = 1000
RAM_PREFIX = 512  # vfio_user inputs with flag 0x20 start with this much guest RAM


class Finding(Exception):
    """Something a fuzz input must never cause."""


class _ExceptionLog(logging.Handler):
    """Turns an exception logged anywhere (log.exception) into a finding."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


def _quiet_logging() -> _ExceptionLog:
    root = logging.getLogger()
    root.handlers[:] = []
    root.setLevel(logging.ERROR)  # warnings about refused input are expected by the thousand
    handler = _ExceptionLog()
    root.addHandler(handler)
    return handler


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class _Checked:
    """Wraps a target: logged exceptions and fd leaks become findings."""

    def __init__(self, run: Callable[[bytes], None]) -> None:
        self.run = run
        self.log = _quiet_logging()
        self.count = 0
        self.fds = -1

    def __call__(self, data: bytes) -> None:
        self.run(data)
        if self.log.records:
            rec = self.log.records[0]
            self.log.records.clear()
            raise Finding(f"exception logged by {rec.name}: {rec.getMessage()}") from rec.exc_info[1]  # type: ignore[index]
        self.count += 1
        if self.count % FD_CHECK_EVERY == 1:
            # An fd whose owner sits in a reference cycle closes when the collector runs, not before; count
            # after a collection so the check sees what is really held, not where the collector happens to be.
            gc.collect()
            now = _open_fds()
            if self.fds < 0:
                self.fds = now
            elif now > self.fds:
                raise Finding(f"fd leak: {now} open, {self.fds} at the start")


# ------------------------------------------------------------------------------------------ vfio_user


def vfio_user() -> Callable[[bytes], None]:
    from device.nic.assembly import build_card
    from device.profile import load_profile
    from device.vfio_user import protocol as p
    from device.vfio_user.server import VfioUserServer

    card = build_card(load_profile())
    server = VfioUserServer("/nonexistent/fuzz.sock", card)  # never listens: clients are adopted
    ram_size = 1 << 20
    ram = os.memfd_create("fuzz-guest-ram", os.MFD_ALLOW_SEALING)
    os.ftruncate(ram, ram_size)
    caps = b'{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576}}\0'
    version = p.build_message(0, p.Command.VERSION, p.VERSION_HEAD.pack(0, 0) + caps)
    # DMA_MAP of the guest RAM at IOVA 0: ring work reaches real memory.
    dma_map = p.build_message(1, p.Command.DMA_MAP, p.DMA_MAP.pack(32, 3, 0, 0, ram_size))

    def run(data: bytes) -> None:
        flags = data[0] if data else 0
        body = data[1:]
        if flags & 0x20:  # the first RAM_PREFIX bytes are guest RAM at IOVA 0 (descriptors, buffers)
            os.pwrite(ram, body[:RAM_PREFIX].ljust(RAM_PREFIX, b"\0"), 0)
            body = body[RAM_PREFIX:]
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        b.setblocking(False)
        server.adopt_client(a)
        conn = server._conn
        try:
            if flags & 1:  # negotiated (and guest RAM mapped), so READY-state handlers run
                conn.receive_data(version)
                conn.receive_data(dma_map, [os.dup(ram)])
                server._process()
            fds: list[int] = []
            if flags & 2:
                fds.append(os.eventfd(0, os.EFD_NONBLOCK))
            if flags & 4:
                fds.append(os.dup(ram))
            step = (1, 7, 64, 4096)[(flags >> 3) & 3]
            for i in range(0, len(body), step):
                if server._conn is not conn:
                    break  # disconnected: the rest is never read
                conn.receive_data(body[i : i + step], fds if i == 0 else ())
                fds = []
                server._process()
                server._run_ready()
            for fd in fds:  # never handed over (no data)
                os.close(fd)
            if server._conn is conn:
                conn.receive_data(b"")  # EOF
                server._process()
            _drain(b)
        finally:
            server._drop_client("fuzz input done")
            server._timers.clear()
            server._ready_q.clear()
            a.close()
            b.close()

    return run


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(1 << 20):
            pass
    except (BlockingIOError, ConnectionError):
        pass


# ------------------------------------------------------------------------------------------ admin


def _firmware(sa_capacity: int = 256):
    from firmware_model.capabilities import Capabilities
    from firmware_model.firmware import Firmware

    # Every algorithm and feature on, so every decoder branch is reachable (the v1 commands take 3DES).
    section = {"sa_capacity": sa_capacity,
               "encryption": ["3des-cbc", "aes-gcm-128", "aes-gcm-192", "aes-gcm-256", "aes-cbc-128",
                              "aes-cbc-192", "aes-cbc-256", "null"],
               "integrity": ["hmac-md5-96", "hmac-sha1-96", "hmac-sha256-128", "aes-gmac-128", "aes-gmac-192",
                             "aes-gmac-256"],
               "udp_esp": ["transport", "tunnel"], "transport_tunnel_combined": True, "ipv4_options": True}
    return Firmware(Capabilities.from_profile(section, where="fuzz"))


def admin() -> Callable[[bytes], None]:
    from device.contract.ndis import Opcode

    fw = _firmware()
    opcodes = [int(o) for o in Opcode] + [0xFFFF]
    runs = [0]

    def run(data: bytes) -> None:
        if len(data) < 1:
            return
        opcode = opcodes[data[0] % len(opcodes)]
        status, response = fw.execute(opcode, data[1:])
        if not isinstance(status, int) or not isinstance(response, bytes):
            raise Finding(f"execute returned {type(status).__name__}, {type(response).__name__}")
        runs[0] += 1
        if runs[0] % 512 == 0:  # keep the SA table from filling for good
            fw.reset()

    return run


# ------------------------------------------------------------------------------------------ esp_rx

A, B = "192.0.2.1", "192.0.2.2"
A6, B6 = "2001:db8::1", "2001:db8::2"
GCM = {"alg": "aes-gcm-128", "key": "4c80cdefbb5d10da906ac73c3613a634", "salt": "2e443b68"}
SA_SPECS = [  # transport GCM, tunnel CBC+HMAC over IPv6, AH, UDP-ESP, ESN, 3DES+SHA1
    {"spi": 0x1001, "src": A, "dst": B, "aead": GCM},
    {"spi": 0x1002, "mode": "tunnel", "src": "10.0.0.1", "dst": "10.0.0.2", "tunnel": {"src": A6, "dst": B6},
     "cipher": {"alg": "aes-cbc-128", "key": "00" * 16}, "integrity": {"alg": "hmac-sha256-128", "key": "11" * 32}},
    {"spi": 0x1003, "proto": "ah", "src": A, "dst": B, "integrity": {"alg": "hmac-sha1-96", "key": "22" * 20}},
    {"spi": 0x1004, "src": A, "dst": B, "aead": GCM, "encap": {"type": "udp", "sport": 4500, "dport": 4500}},
    {"spi": 0x1005, "src": A, "dst": B, "aead": GCM, "esn": True, "seq": 0xFFFF_FF00, "replay_window": 128},
    {"spi": 0x1006, "src": A, "dst": B, "cipher": {"alg": "3des-cbc", "key": "33" * 24},  # what v1 commands take
     "integrity": {"alg": "hmac-sha1-96", "key": "44" * 20}},
]
MAC_HDR = bytes.fromhex("0249504e4300" "020000000001" "0800")
MAC_HDR6 = MAC_HDR[:12] + b"\x86\xdd"


def _sa_pair():
    from device.contract.sa_file import parse_sa_document

    out = parse_sa_document({"sas": [{**s, "direction": "outbound"} for s in SA_SPECS]})
    inb = parse_sa_document({"sas": [{**s, "direction": "inbound"} for s in SA_SPECS]})
    return out, inb


def sealing_firmware():
    """A firmware holding the outbound twins as packet-offload SAs (it builds whole ESP/AH packets from
    plain ones), and their handles in SA_SPECS order."""
    tx_fw = _firmware()
    out, _ = _sa_pair()
    return tx_fw, [tx_fw.add_sa([p], packet_offload=True) for p in out]


def _ipv4(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    import ipaddress

    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64, proto, 0,
                                ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed))
    total = sum(struct.unpack("!10H", hdr))  # RFC 791 header checksum
    total = (total & 0xFFFF) + (total >> 16)
    struct.pack_into("!H", hdr, 10, ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF)
    return bytes(hdr) + payload


def _ipv6(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    import ipaddress

    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), proto, 64, ipaddress.IPv6Address(src).packed,
                       ipaddress.IPv6Address(dst).packed) + payload


def esp_rx() -> Callable[[bytes], None]:
    """Input: kind byte, selector byte, then data. kind bit 0: data is a raw frame off the wire. Else
    SA = (kind >> 1) % 6: ESP SAs get ``data`` as the *plaintext* (inner packet, padding, pad length,
    next header, all fuzzed) sealed here with the SA's key and a valid ICV, so decryption succeeds and
    the trailer and inner-header parsing see hostile bytes; bit 6 instead sends ``data`` as a UDP payload
    through the outbound twin (packet offload, the card's own encapsulation) and bit 7 then damages one
    byte after sealing. The AH SA always goes through the twin."""
    from firmware_model.esp import build_esp_transform

    tx_fw, tx_handles = sealing_firmware()
    rx_fw = _firmware()
    out, inb = _sa_pair()
    for p in inb:
        rx_fw.add_sa([p])
    seals = [None if p.proto == 51 else build_esp_transform(p) for p in out]
    seqs = [p.seq for p in out]

    def sealed(i: int, data: bytes) -> bytes:
        p, t = out[i], seals[i]
        seqs[i] += 1
        seq = seqs[i]
        hdr = struct.pack("!II", p.spi, seq & 0xFFFF_FFFF)
        iv = bytes(t.iv_len)
        plain = data
        if t.block > 1:
            plain = plain[: len(plain) - len(plain) % t.block] or bytes(t.block)
        esp = hdr + iv + t.seal(hdr, (seq >> 32) if p.esn else None, iv, plain)
        if p.encap is not None:  # RFC 3948: UDP header, checksum 0
            esp = struct.pack("!HHHH", p.encap.sport, p.encap.dport, 8 + len(esp), 0) + esp
        if ":" in p.src:
            return MAC_HDR6 + _ipv6(p.src, p.dst, 17 if p.encap else 50, esp)
        return MAC_HDR + _ipv4(p.src, p.dst, 17 if p.encap else 50, esp)

    def run(data: bytes) -> None:
        if len(data) < 2:
            return
        kind, sel, body = data[0], data[1], data[2:]
        i = (kind >> 1) % len(out)
        if kind & 1:  # a raw frame off the wire
            frame = body
        elif seals[i] is not None and not kind & 0x40:
            frame = sealed(i, body)
        else:  # the outbound twin encapsulates a datagram carrying the input
            p = out[i]
            src, dst = (p.inner_src, p.inner_dst) if p.inner_src else (p.src, p.dst)
            inner = _ipv4(src, dst, 17, struct.pack("!HHHH", 4000, 5000, 8 + len(body), 0) + body)
            res = tx_fw.transmit(MAC_HDR + inner, tx_handles[i], True)
            if res.frame is None:  # refused (e.g. longer than the SA's framing allows): nothing to receive
                return
            frame = res.frame
            if kind & 0x80 and len(frame) > 20:
                damaged = bytearray(frame)
                damaged[14 + sel % (len(frame) - 14)] ^= 0xFF
                frame = bytes(damaged)
        res = rx_fw.receive(frame)
        if not isinstance(res.frame, bytes | bytearray):
            raise Finding("receive returned no frame")

    return run


TARGETS: dict[str, Callable[[], Callable[[bytes], None]]] = {
    "vfio_user": vfio_user,
    "admin": admin,
    "esp_rx": esp_rx,
}


def make(name: str) -> _Checked:
    return _Checked(TARGETS[name]())

