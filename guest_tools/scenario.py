"""Guest-side interop scenarios: the card (through guest_tools.driver) against a Linux XFRM peer.

Runs inside the VM, from /opt/ipsec-nic:

    python3 -m guest_tools.scenario setup            # once per boot: netns `peer` around the virtio-net NIC
    python3 -m guest_tools.scenario run SPEC_BASE64  # one scenario; prints one result line (JSON)
    python3 -m guest_tools.scenario run-many SPECS_BASE64  # a list in one process; one line per case

Topology (guest_tools/xfrm_peer.py PeerNet): the virtio-net NIC sits in netns ``peer`` with 10.0.0.2 /
fd00::2 and permanent neighbour entries for the card's 10.0.0.1 / fd00::1 -> the card's MAC. Its QEMU
netdev is the other end of the card's wire. The card has no kernel netdev: this process builds the
card's frames and reads what the card received. The peer's sockets are opened inside the netns
(os.setns), so a single process drives both ends: the peer kernel works asynchronously when a socket
sends or a frame arrives.

A scenario: SAs for both directions built from one spec, in the SA-file shape (device.contract.sa_file)
with keys drawn here (they never leave the guest); the card gets them through the admin queue, the
peer gets the mirrored states and policies. Traffic: ``count`` UDP datagrams card -> peer (the card
encrypts) and peer -> card (the card decrypts); payloads are a pure function of (name, direction,
index, size), so the host can recompute what both sides must have decrypted. The result reports
counts, digests of the decrypted payloads, CryptoStatus counts, the card's statistics and SA
counters, the peer's `ip -s xfrm state` counters and the /proc/net/xfrm_stat delta.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from guest_tools.xfrm_peer import (
    FLUSH_COMMANDS,
    PeerNet,
    SaOrBundle,
    batch_text,
    netns_setup,
    parse_state_stats,
    parse_xfrm_stat,
    peer_commands,
)

RESULT_PREFIX = "@@scenario-result "
SETUP_FILE = Path("/run/ipsec-nic-peer.json")
NET = PeerNet()
C2P_SPORT, C2P_DPORT = 4001, 5001  # card -> peer datagrams
P2C_SPORT, P2C_DPORT = 4002, 5002  # peer -> card datagrams
NAT_T_PORT = 4500
UDP_ENCAP = 100  # linux/udp.h: setsockopt(SOL_UDP, UDP_ENCAP, ...)
UDP_ENCAP_ESPINUDP = 2
SOL_UDP = 17
# Modules for every algorithm the matrix uses (tests/vm/test_interop_algorithms.py); md5, sha1, hmac and
# cbc are built in on the Debian kernel, modprobe accepts them as no-ops.
PEER_MODULES = ("xfrm_user", "esp4", "esp6", "ah4", "ah6", "gcm", "ghash_generic", "seqiv", "cbc", "hmac", "md5",
                "sha1", "sha256", "aes_generic", "crypto_null", "des_generic", "des3_ede_x86_64")
SPI_OUT, SPI_IN = 0x1000, 0x2000  # card's outbound / inbound SA (fresh SPIs per scenario via spi_base)


def _algorithms() -> dict[str, dict[str, Any]]:
    """Spec name -> SA-file algorithm sections (keys filled in by fill_keys).

    AES-GCM: ``aes-gcm-K`` (ICV 16) and ``aes-gcm-K-icvN`` (RFC 4106 §6: 8, 12, 16); AES-GMAC
    ``aes-gmac-K`` (RFC 4543, ICV 16); ``CIPHER+INTEGRITY`` for AES-CBC, 3DES-CBC and NULL (RFC 4303
    §3.2: ESP with integrity only) with each HMAC."""
    algs: dict[str, dict[str, Any]] = {}
    for bits in (128, 192, 256):
        algs[f"aes-gcm-{bits}"] = {"aead": {"alg": f"aes-gcm-{bits}", "icv": 16}}
        for icv in (8, 12):
            algs[f"aes-gcm-{bits}-icv{icv}"] = {"aead": {"alg": f"aes-gcm-{bits}", "icv": icv}}
        algs[f"aes-gmac-{bits}"] = {"aead": {"alg": f"aes-gmac-{bits}", "icv": 16}}
    for cipher in ("aes-cbc-128", "aes-cbc-192", "aes-cbc-256", "3des-cbc", "null"):
        for integrity in ("hmac-md5-96", "hmac-sha1-96", "hmac-sha256-128"):
            algs[f"{cipher}+{integrity}"] = {"cipher": {"alg": cipher}, "integrity": {"alg": integrity}}
    return algs


ALGORITHMS = _algorithms()
# AH integrity (RFC 4302 §3.2: HMAC only on this card, datasheet §12.1 decision 23). Spec.ah names one: with
# alg "none" the scenario's SAs are AH only, otherwise ESP-then-AH bundles (RFC 4301 §4.5 transport adjacency).
AH_ALGORITHMS = ("hmac-md5-96", "hmac-sha1-96", "hmac-sha256-128")
AH_SPI_OFFSET = 0x800  # the AH half of a bundle: SPI = the ESP SA's SPI + this


def _key_len(name: str) -> int:
    """Key bytes (without salt) of an SA-file algorithm name, from the card's contract tables."""
    from device.contract.algorithms import AUTH_INFO, ENC_INFO

    for info in (*ENC_INFO.values(), *AUTH_INFO.values()):
        if info.name == name:
            return info.key_len
    raise ValueError(f"unknown algorithm {name!r}")


class ScenarioError(RuntimeError):
    """The scenario could not be set up (not: traffic failed; that is a result)."""


# --- the spec and the SAs (pure) ------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    name: str = "scenario"
    family: int = 4
    mode: str = "transport"  # transport | tunnel
    alg: str = "aes-gcm-128"  # ALGORITHMS, or "none" with ``ah`` (AH-only SAs)
    ah: str = ""  # AH integrity (AH_ALGORITHMS): AH-only SAs (alg "none") or ESP-then-AH bundles
    encap: bool = False  # UDP-ESP, RFC 3948, ports 4500/4500
    esn: bool = False
    seq: int = 0  # both SAs: outbound last-sent number / inbound window start
    offload: str = "crypto"  # crypto | packet
    v1: bool = False  # crypto offload through V1_ADD_SA (the NDIS v1 command a v1 driver uses)
    count: int = 8
    size: int = 200  # UDP payload bytes
    spi_base: int = 0  # added to SPI_OUT / SPI_IN (distinct SPIs per scenario in one boot)
    replay_window: int = 128
    directions: tuple[str, ...] = ("card-to-peer", "peer-to-card")
    peer_keys: str = "same"  # "different": the peer gets other keys (a negative test: nothing may decrypt)
    keep_sas: bool = False  # leave the SAs in place at the end (demo: delete them in a later step)
    timeout: float = 10.0  # seconds to wait for each direction's traffic

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Spec:
        known = set(Spec.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown scenario keys: {', '.join(sorted(unknown))}")
        data = dict(data)
        if "directions" in data:
            data["directions"] = tuple(data["directions"])
        spec = Spec(**data)
        spec.check()
        return spec

    def check(self) -> None:
        if self.family not in (4, 6):
            raise ValueError("family must be 4 or 6")
        if self.mode not in ("transport", "tunnel"):
            raise ValueError("mode must be transport or tunnel")
        if self.alg not in ALGORITHMS and not (self.alg == "none" and self.ah):
            raise ValueError(f"alg must be one of {', '.join(ALGORITHMS)} (or none, with ah)")
        if self.ah and self.ah not in AH_ALGORITHMS:
            raise ValueError(f"ah must be one of {', '.join(AH_ALGORITHMS)}")
        if self.ah and (self.offload != "crypto" or self.encap):
            raise ValueError("AH runs in crypto offload without UDP encapsulation (packet offload and RFC 3948 "
                             "are ESP only)")
        if self.offload not in ("crypto", "packet"):
            raise ValueError("offload must be crypto or packet")
        if self.v1 and (self.offload != "crypto" or self.esn):
            raise ValueError("v1 SAs are crypto offload without ESN (NDIS v1 has neither)")
        if not 1 <= self.count <= 100:
            raise ValueError("count must be 1..100 (the card's RX ring holds 127 frames)")
        if not 16 <= self.size <= 1200:
            raise ValueError("size must be 16..1200 bytes")
        if self.peer_keys not in ("same", "different"):
            raise ValueError("peer_keys must be same or different")
        for d in self.directions:
            if d not in ("card-to-peer", "peer-to-card"):
                raise ValueError(f"unknown direction {d!r}")

    def to_b64(self) -> str:
        return base64.b64encode(json.dumps(asdict(self)).encode()).decode("ascii")

    @property
    def tunnel(self) -> bool:
        return self.mode == "tunnel"


def payload(name: str, direction: str, index: int, size: int) -> bytes:
    """The UDP payload of datagram ``index``: a readable tag, then a counter pattern, ``size`` bytes."""
    head = f"ipsec-nic {name} {direction} #{index:04d} ".encode()
    body = bytes((index + i) & 0xFF for i in range(max(0, size - len(head))))
    return (head + body)[:size]


def payload_digest(payloads: list[bytes]) -> str:
    """SHA-256 over the payloads in order, each prefixed by its length."""
    h = hashlib.sha256()
    for p in payloads:
        h.update(struct.pack("!I", len(p)) + p)
    return h.hexdigest()


def expected_digest(spec: Spec, direction: str) -> str:
    return payload_digest([payload(spec.name, direction, i, spec.size) for i in range(spec.count)])


def sa_document(spec: Spec, net: PeerNet = NET) -> dict[str, Any]:
    """The card's two SAs in the SA-file shape, without keys: card -> peer (outbound), peer -> card (inbound)."""
    card_addr, peer_addr = net.addrs(spec.family, tunnel=False)
    inner_card, inner_peer = net.addrs(spec.family, tunnel=True)
    sas = []
    for direction, spi, src, dst, isrc, idst in (
        ("outbound", SPI_OUT + spec.spi_base, card_addr, peer_addr, inner_card, inner_peer),
        ("inbound", SPI_IN + spec.spi_base, peer_addr, card_addr, inner_peer, inner_card),
    ):
        sa: dict[str, Any] = {"spi": spi, "direction": direction, "mode": spec.mode}
        if spec.tunnel:
            sa.update(src=isrc, dst=idst, tunnel={"src": src, "dst": dst})
        else:
            sa.update(src=src, dst=dst)
        if spec.encap:
            sa["encap"] = {"type": "udp", "sport": NAT_T_PORT, "dport": NAT_T_PORT}
        if spec.alg == "none":
            sa.update(proto="ah", integrity={"alg": spec.ah})
        else:
            sa.update(json.loads(json.dumps(ALGORITHMS[spec.alg])))  # deep copy
            if spec.ah:
                sa["ah"] = {"spi": spi + AH_SPI_OFFSET, "integrity": {"alg": spec.ah}}
        sa.update(esn=spec.esn, seq=spec.seq, replay_window=spec.replay_window)
        sas.append(sa)
    return {"sas": sas}


def fill_keys(doc: dict[str, Any], random_bytes=os.urandom) -> dict[str, Any]:
    """Fresh random keys (and GCM salts) for every algorithm section that has none (a bundle's AH too)."""
    for sa in [*doc["sas"], *(entry["ah"] for entry in doc["sas"] if "ah" in entry)]:
        for section in ("aead", "cipher", "integrity"):
            spec = sa.get(section)
            if spec is None or "key" in spec:
                continue
            length = _key_len(spec["alg"])
            if length:
                spec["key"] = random_bytes(length).hex()
            if section == "aead":
                spec["salt"] = random_bytes(4).hex()
    return doc


# --- frames (pure) ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Datagram:
    src: str
    dst: str
    sport: int
    dport: int
    data: bytes


def parse_udp_frame(frame: bytes) -> Datagram | None:
    """The UDP datagram in an Ethernet frame (IPv4 without fragments, IPv6 without extension headers)."""
    if len(frame) < 14:
        return None
    etype = struct.unpack_from("!H", frame, 12)[0]
    at = 14
    if etype == 0x0800 and len(frame) >= at + 20:
        ihl = (frame[at] & 0xF) * 4
        total = struct.unpack_from("!H", frame, at + 2)[0]
        if frame[at + 9] != 17 or struct.unpack_from("!H", frame, at + 6)[0] & 0x3FFF or ihl < 20:
            return None
        src, dst = str(ipaddress.IPv4Address(frame[at + 12:at + 16])), str(ipaddress.IPv4Address(frame[at + 16:at + 20]))
        udp, end = at + ihl, at + total
    elif etype == 0x86DD and len(frame) >= at + 40:
        if frame[at + 6] != 17:
            return None
        src = str(ipaddress.IPv6Address(frame[at + 8:at + 24]))
        dst = str(ipaddress.IPv6Address(frame[at + 24:at + 40]))
        udp, end = at + 40, at + 40 + struct.unpack_from("!H", frame, at + 4)[0]
    else:
        return None
    if end > len(frame) or end < udp + 8:
        return None
    sport, dport, length = struct.unpack_from("!HHH", frame, udp)
    if length < 8 or udp + length > end:
        return None
    return Datagram(src, dst, sport, dport, bytes(frame[udp + 8:udp + length]))


# --- guest plumbing ---------------------------------------------------------------------------------


def _ip(args: list[str], stdin: str | None = None, netns: str | None = NET.netns, check: bool = True) -> str:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if check and proc.returncode != 0:
        # Batch input may hold keys: never echo it, only ip's own message (which names the line number).
        raise ScenarioError(f"`ip {' '.join(args[:3])}` failed ({proc.returncode}): {proc.stderr.strip()[:300]}")
    return proc.stdout


def ip_batch(commands: list[list[str]], netns: str | None = NET.netns) -> None:
    if commands:
        _ip(["-batch", "-"], stdin=batch_text(commands), netns=netns)


@contextlib.contextmanager
def in_netns(name: str):
    """Switch this thread into netns ``name`` for the block (sockets made inside stay there)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        os.setns(target, os.CLONE_NEWNET)
        try:
            yield
        finally:
            os.setns(home, os.CLONE_NEWNET)
    finally:
        os.close(target)
        os.close(home)


def peer_xfrm_stat(netns: str = NET.netns) -> dict[str, int]:
    with in_netns(netns):
        return parse_xfrm_stat(Path("/proc/thread-self/net/xfrm_stat").read_text())


def find_virtio_iface() -> str:
    for dev in sorted(Path("/sys/class/net").iterdir()):
        driver = dev / "device" / "driver"
        if driver.exists() and os.path.basename(os.readlink(driver)) == "virtio_net":
            return dev.name
    raise ScenarioError("no virtio-net interface in the root netns (was the VM started with the peer NIC?)")


def setup(net: PeerNet = NET) -> dict[str, Any]:
    """Once per boot: move the virtio-net NIC into the peer netns (idempotent: reuses an earlier setup)."""
    if SETUP_FILE.exists() and Path(f"/run/netns/{net.netns}").exists():
        return json.loads(SETUP_FILE.read_text())
    from guest_tools.driver import open_card

    iface = find_virtio_iface()
    peer_mac = Path(f"/sys/class/net/{iface}/address").read_text().strip()
    card = open_card(reset=True)
    try:
        card_mac, bdf = card.ident.mac_text, getattr(card, "bdf", "")
    finally:
        card.close()
    # Load the peer's ESP and crypto modules now, in one go: left to on-demand loading, the first
    # `ip xfrm state add` raced esp4's loading once here ("Requested type not found").
    subprocess.run(["modprobe", "-q", "-a", *PEER_MODULES], capture_output=True)
    root, inside = netns_setup(iface, card_mac, net)
    for argv in root:
        _ip(argv, netns=None)
    ip_batch(inside, net.netns)
    info = {"iface": iface, "peer_mac": peer_mac, "card_mac": card_mac, "card_bdf": bdf, "netns": net.netns}
    SETUP_FILE.write_text(json.dumps(info))
    return info


# --- one scenario -----------------------------------------------------------------------------------


@dataclass
class Direction:
    sent: int = 0
    tx_status: dict[str, int] = field(default_factory=dict)  # card TX completions (card -> peer)
    received: int = 0  # datagrams with the expected addresses/ports
    matched: int = 0  # ... whose payload is the expected one, in order
    digest: str = ""  # payload_digest of what was received, in arrival order
    crypto_status: dict[str, int] = field(default_factory=dict)  # card RX (peer -> card)
    other_frames: int = 0  # frames the card received that are not this scenario's (IPv6 MLD, ...)
    wrong_handle: int = 0
    seconds: float = 0.0
    error: str = ""


# Socket policies (linux/xfrm.h, linux/in.h, linux/in6.h): IP_XFRM_POLICY / IPV6_XFRM_POLICY take a
# struct xfrm_userpolicy_info: selector (56 bytes, family at 40), lifetime cfg (64), lifetime cur (32),
# priority, index (u32), dir, action, flags, share (u8); 168 bytes with the 8-byte alignment.
IP_XFRM_POLICY, IPV6_XFRM_POLICY = 17, 35
XFRM_POLICY_IN, XFRM_POLICY_OUT = 0, 1
XFRM_POLICY_ALLOW = 0
_XFRM_INF = (1 << 64) - 1


def bypass_policy(family: int, direction: int) -> tuple[int, int, bytes]:
    """setsockopt arguments giving a socket an ALLOW (bypass) policy, as IKE daemons do for their
    NAT-T socket. Linux checks the inbound policy on the ESP-in-UDP datagram itself before handing
    it to the encap handler (net/ipv4/udp.c udp_queue_rcv_one_skb), and a host-to-host ``dir in``
    policy matches that outer datagram too; without the bypass it is dropped (XfrmInTmplMismatch)."""
    info = bytearray(168)
    struct.pack_into("=H", info, 40, socket.AF_INET if family == 4 else socket.AF_INET6)  # sel.family
    struct.pack_into("=4Q", info, 56, _XFRM_INF, _XFRM_INF, _XFRM_INF, _XFRM_INF)  # no byte/packet limits
    struct.pack_into("=IIBBBB", info, 152, 0, 0, direction, XFRM_POLICY_ALLOW, 0, 0)
    if family == 4:
        return socket.IPPROTO_IP, IP_XFRM_POLICY, bytes(info)
    return socket.IPPROTO_IPV6, IPV6_XFRM_POLICY, bytes(info)


def _open_peer_sockets(spec: Spec, peer_addr: str) -> tuple[socket.socket, socket.socket, list[socket.socket]]:
    fam = socket.AF_INET if spec.family == 4 else socket.AF_INET6
    with in_netns(NET.netns):
        rx = socket.socket(fam, socket.SOCK_DGRAM)
        rx.bind((peer_addr, C2P_DPORT))
        rx.setblocking(False)
        tx = socket.socket(fam, socket.SOCK_DGRAM)
        tx.bind((peer_addr, P2C_SPORT))
        encap: list[socket.socket] = []
        if spec.encap:
            # Linux decapsulates ESP-in-UDP only on a socket with UDP_ENCAP_ESPINUDP bound to the port
            # (RFC 3948; net/ipv4/udp.c udp_lib_setsockopt UDP_ENCAP).
            s = socket.socket(fam, socket.SOCK_DGRAM)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.setsockopt(SOL_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP)
            for direction in (XFRM_POLICY_IN, XFRM_POLICY_OUT):
                s.setsockopt(*bypass_policy(spec.family, direction))
            s.bind(("0.0.0.0" if fam == socket.AF_INET else "::", NAT_T_PORT))
            encap.append(s)
    return rx, tx, encap


def peer_datagrams(rx: socket.socket, sender: tuple[str, int], count: int, timeout: float) -> list[bytes]:
    """Up to ``count`` datagrams from ``sender`` (address, port) on the peer's non-blocking socket ``rx``,
    waiting at most ``timeout`` seconds in all; datagrams from anyone else are skipped."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        try:
            data, source = rx.recvfrom(65535)
        except BlockingIOError:
            time.sleep(0.005)
            continue
        if source[:2] == sender:
            got.append(data)
    return got


def _card_to_peer(card, spec: Spec, handle: int, info: dict, addrs: tuple[str, str], rx: socket.socket) -> Direction:
    from guest_tools import packets

    d = Direction()
    t0 = time.monotonic()
    card_addr, peer_addr = addrs
    dst_mac, src_mac = packets.parse_mac(info["peer_mac"]), packets.parse_mac(info["card_mac"])
    status: Counter[str] = Counter()
    mode = spec.offload
    try:
        for i in range(spec.count):
            data = payload(spec.name, "card-to-peer", i, spec.size)
            frame = packets.ethernet(dst_mac, src_mac, packets.udp_packet(card_addr, peer_addr, C2P_SPORT,
                                                                          C2P_DPORT, data))
            card.send(frame, handle, mode)
            d.sent += 1
            for c in card.poll_tx():
                status[c.status_name] += 1
        for c in card.flush_tx():
            status[c.status_name] += 1
    except Exception as exc:  # a card error is a result to report, not a crash
        d.error = f"{type(exc).__name__}: {exc}"
    d.tx_status = dict(status)
    got = peer_datagrams(rx, (card_addr, C2P_SPORT), d.sent, spec.timeout)
    d.received = len(got)
    d.matched = sum(1 for i, g in enumerate(got) if g == payload(spec.name, "card-to-peer", i, spec.size))
    d.digest = payload_digest(got)
    d.seconds = round(time.monotonic() - t0, 3)
    return d


def card_sas(doc: dict[str, Any]) -> list[SaOrBundle]:
    """The SA document's SAs: an SaParams each, or an (ESP, AH) tuple for a bundle (xfrm_peer's shape)."""
    from device.contract.sa_file import parse_sa_entries

    return [e.params if e.ah is None else (e.params, e.ah) for e in parse_sa_entries(doc)]


def _peer_to_card(card, spec: Spec, handle: int, addrs: tuple[str, str], tx: socket.socket) -> Direction:
    d = Direction()
    t0 = time.monotonic()
    card_addr, peer_addr = addrs
    for i in range(spec.count):
        try:
            tx.sendto(payload(spec.name, "peer-to-card", i, spec.size), (card_addr, P2C_DPORT))
            d.sent += 1
        except OSError as exc:
            d.error = f"peer send failed: {exc}"
            break
    statuses: Counter[str] = Counter()
    got: list[bytes] = []
    deadline = time.monotonic() + spec.timeout
    while len(got) < d.sent and time.monotonic() < deadline:
        for pkt in card.recv(timeout=min(0.5, max(0.0, deadline - time.monotonic())), limit=64):
            if pkt.crypto_done:
                statuses[pkt.crypto_status_name] += 1
                if pkt.handle != handle:
                    d.wrong_handle += 1
            inner = pkt.frame if pkt.decapsulated else pkt.inner
            dgram = parse_udp_frame(inner) if inner is not None else None
            if (dgram is None or dgram.src != peer_addr or dgram.dst != card_addr
                    or (dgram.sport, dgram.dport) != (P2C_SPORT, P2C_DPORT)):
                if not pkt.crypto_done:
                    d.other_frames += 1
                continue
            got.append(dgram.data)
    d.crypto_status = dict(statuses)
    d.received = len(got)
    d.matched = sum(1 for i, g in enumerate(got) if g == payload(spec.name, "peer-to-card", i, spec.size))
    d.digest = payload_digest(got)
    d.seconds = round(time.monotonic() - t0, 3)
    return d


def run(spec: Spec) -> dict[str, Any]:
    """Run one scenario; returns the result (JSON-able). Raises ScenarioError if it cannot be set up."""
    from guest_tools.driver import open_card

    t0 = time.monotonic()
    info = setup()
    timings: dict[str, float] = {}
    doc = fill_keys(sa_document(spec))
    sas = card_sas(doc)
    (out_sa, out_ah), (in_sa, in_ah) = (sa if isinstance(sa, tuple) else (sa, None) for sa in sas)
    addrs = NET.addrs(spec.family, spec.tunnel)
    ip_batch(FLUSH_COMMANDS)
    stat_before = peer_xfrm_stat()
    card = open_card(reset=True)  # CTRL.RESET: no SAs, statistics at zero
    sockets: list[socket.socket] = []
    result: dict[str, Any] = {"name": spec.name, "spec": asdict(spec)}
    try:
        timings["open"] = round(time.monotonic() - t0, 3)
        handles = {"outbound": card.add_sa(out_sa, offload=spec.offload, v1=spec.v1, ah=out_ah),
                   "inbound": card.add_sa(in_sa, offload=spec.offload, v1=spec.v1, ah=in_ah)}
        peer_sas = sas if spec.peer_keys == "same" else card_sas(fill_keys(sa_document(spec)))
        ip_batch(peer_commands(peer_sas))
        timings["sas_added"] = round(time.monotonic() - t0, 3)
        result["handles"] = handles
        result["card_sas"] = [{"handle": e.offload_handle, "spi": e.spi, "direction": "in" if e.direction == 1
                               else "out", "mode": "tunnel" if e.mode else "transport", "family": e.family,
                               "flags": e.flags} for e in card.list_sas()]
        rx, tx, encap = _open_peer_sockets(spec, addrs[1])
        sockets = [rx, tx, *encap]
        if "card-to-peer" in spec.directions:
            result["card_to_peer"] = vars(_card_to_peer(card, spec, handles["outbound"], info, addrs, rx))
            host_sa = card.host.get(handles["outbound"])
            result["esn_hi_pushed"] = host_sa.seq_hi_pushed if host_sa is not None else None
            result["next_seq"] = host_sa.next_seq if host_sa is not None else None
        if "peer-to-card" in spec.directions:
            result["peer_to_card"] = vars(_peer_to_card(card, spec, handles["inbound"], addrs, tx))
        timings["traffic"] = round(time.monotonic() - t0, 3)
        result["card_stats"] = card.stats()
        result["firmware_stats"] = {k: v for k, v in vars(card.firmware_stats()).items()}
        result["sa_stats"] = {name: [vars(e) for e in card.sa_stats(h)] for name, h in handles.items()}
        result["peer_states"] = [s.as_dict() for s in parse_state_stats(_ip(["-s", "xfrm", "state"]))]
        after = peer_xfrm_stat()
        result["xfrm_stat_delta"] = {k: v - stat_before.get(k, 0) for k, v in after.items()
                                     if v != stat_before.get(k, 0)}
        result["driver_errors"] = list(card.errors_seen)
        result["sa_delete_requests"] = card.sa_delete_requests
        if not spec.keep_sas:
            result["deleted"] = card.delete_all()
            result["card_sas_after_delete"] = len(card.list_sas())
            ip_batch(FLUSH_COMMANDS)
            result["peer_states_after_flush"] = len(parse_state_stats(_ip(["xfrm", "state"])))
    finally:
        for s in sockets:
            s.close()
        card.close()
    timings["total"] = round(time.monotonic() - t0, 3)
    result["timings"] = timings
    return result


def run_many(specs: list[Spec], emit=None) -> list[dict[str, Any]]:
    """Run scenarios one after the other in this process (one Python start-up and one peer setup for
    all). Each outcome is ``{"case": i, "result": ...}`` or ``{"case": i, "error": ...}``: a case that
    cannot be set up (say, an algorithm the card's profile refuses) does not stop the others."""
    outcomes = []
    for i, spec in enumerate(specs):
        try:
            outcome: dict[str, Any] = {"case": i, "name": spec.name, "result": run(spec)}
        except Exception as exc:  # reported per case; the host decides what it means
            outcome = {"case": i, "name": spec.name, "error": f"{type(exc).__name__}: {exc}"}
        if emit is not None:
            emit(outcome)
        outcomes.append(outcome)
    return outcomes


def specs_to_b64(specs: list[Spec]) -> str:
    return base64.b64encode(json.dumps([asdict(s) for s in specs]).encode()).decode("ascii")


def specs_from_b64(text: str) -> list[Spec]:
    data = json.loads(base64.b64decode(text))
    if not isinstance(data, list):
        raise ValueError("run-many takes a base64 JSON list of scenario specs")
    return [Spec.from_dict(d) for d in data]


def delete_all() -> dict[str, int]:
    """Delete every SA on the card and flush the peer (the demo's last step)."""
    from guest_tools.driver import open_card

    card = open_card()
    try:
        before = len(card.list_sas())
        deleted = card.delete_all()
        after = len(card.list_sas())
    finally:
        card.close()
    ip_batch(FLUSH_COMMANDS)
    peer_after = len(parse_state_stats(_ip(["xfrm", "state"])))
    return {"card_sas_before": before, "deleted": deleted, "card_sas_after": after, "peer_states_after": peer_after}


def _emit(obj: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(obj, sort_keys=True), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        if args == ["setup"]:
            _emit({"setup": setup()})
        elif len(args) == 2 and args[0] == "run":
            spec = Spec.from_dict(json.loads(base64.b64decode(args[1])))
            _emit({"result": run(spec)})
        elif len(args) == 2 and args[0] == "run-many":
            specs = specs_from_b64(args[1])
            setup()
            run_many(specs, emit=_emit)
            _emit({"done": len(specs)})
        elif args == ["delete-all"]:
            _emit({"deleted": delete_all()})
        else:
            print("usage: python3 -m guest_tools.scenario setup | run SPEC_BASE64 | run-many SPECS_BASE64 | "
                  "delete-all", file=sys.stderr)
            return 2
    except (ScenarioError, ValueError, OSError) as exc:
        _emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    except Exception as exc:  # the driver's CardError and friends: report, never a bare traceback
        _emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
