"""Guest check: the card enforces receive-side policy against a Linux XFRM peer (tests/vm/test_receive_policy.py).

    python3 -m guest_tools.checks.policy all SPEC

Runs in the interop topology (guest_tools/scenario.py setup: the virtio-net NIC in netns ``peer`` is the
other end of the card's wire). The card is driven from this process with the polling driver; the peer's
kernel (esp4, its crypto) builds every ESP packet, so what the card is given is authentic by construction.
The two v1 SAs are added through the guest CLI in processes of their own (`sa add --v1` with
--sel-proto/--sel-dport and the key on stdin; `sa add --sa FILE --v1`) before this process opens the card;
the others come from SA-file documents through the same loader (device/contract/sa_file.py, with its
offload-mode check). Keys are drawn here and never leave the guest.

Cases (each reports what it observed; the host test decides):

* ``v1_transport``: V1_ADD_SA inbound transport SA, filter = 10.0.0.2 -> 10.0.0.1, UDP, DestPort 5001
  (datasheet §12.1 rows 14/15). The peer's state has source 0.0.0.0, which Linux's output lookup takes for
  any source (net/xfrm/xfrm_state.c xfrm_state_find: the wildcard-source pass, xfrm_state_addr_check), so
  the same SPI and key go out from 10.0.0.2 and from a second address 10.0.0.3, to port 5001 and 5002.
* ``v1_tunnel``: V1_ADD_SA inbound tunnel SA, filter = the inner connection 192.168.2.1 -> 192.168.1.1
  (row 18), with ``other_port`` also UDP to one port. The peer's tunnel state has no ``sel``; one policy
  for 192.168.2.0/24 sends both the right inner source and a spoofed one (192.168.2.9) through it.
* ``packet_tunnel``: the same with an ADD_SA_PACKET SA (row 19, RFC 4301 §5.2): spoofed inner packets (and
  ones to another port) are dropped and counted in RX_POLICY_DROP.
* ``v2_tunnel``: the same with a V2 crypto-offload SA: the card has no selector (row 8) and indicates
  SUCCESS; the guest driver strips ESP and drops what is outside the inner selector (guest_tools/txrx.py).
* ``natt``: RFC 3948 transport UDP-ESP through a real NAT (row 20). Netns ``natin`` (172.16.0.2) sits
  behind netns ``peer`` on a veth; it has the XFRM states (encap espinudp 4500 4500) and sends from its
  private address; netns ``peer`` forwards and rewrites the outer source to 10.0.0.2 with the kernel's
  stateless NAT (tc act_nat on egress of its NIC). One crypto-offload SA (the spec's port) and one
  packet-offload SA (the next port) on the card, for the public address.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from device.contract.regs import RxWbFlags
from device.contract.sa import SaParams
from device.contract.sa_fields import Offload
from device.contract.sa_file import check_honoured, parse_sa_entries
from guest_tools.checks.common import main, rx_record, stats_delta
from guest_tools.scenario import NET, _ip, in_netns, ip_batch, parse_state_stats, setup
from guest_tools.xfrm_peer import FLUSH_COMMANDS, state_add

PEER2 = "10.0.0.3"  # a second address on the peer's NIC: outside a filter naming 10.0.0.2
SPOOF = "192.168.2.9"  # a second inner source behind the peer (on its loopback)
NAT_NS = "natin"
NAT_PRIVATE, NAT_GW = "172.16.0.2", "172.16.0.1"
SPORT = 4002
ESP_HDR = 8
SHA1_ICV = 12
TIMEOUT = 8.0

def _rand(n: int) -> str:
    return os.urandom(n).hex()


def _sh(argv: list[str], check: bool = True) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode:
        raise RuntimeError(f"`{' '.join(argv[:8])}` failed ({proc.returncode}): {proc.stderr.strip()[:300]}")
    return proc.stdout


def _sa(entry: dict[str, Any], offload: Offload) -> SaParams:
    """One SA from an SA-file entry, checked the way `sa add --sa FILE` checks it for ``offload``."""
    entries = parse_sa_entries({"sas": [entry]})
    check_honoured(entries, offload)
    return entries[0].params


def _cli(args: list[str], stdin: str | None = None) -> str:
    """The guest CLI in its own process, as a user runs it (polling driver: the card keeps its SAs between
    processes and the host's SA state is in /run/ipsec-nic/<bdf>.json)."""
    proc = subprocess.run([sys.executable, "-m", "guest_tools.cli", "--irq", "poll", *args], input=stdin,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"guest CLI {' '.join(args[:2])} exited {proc.returncode}: {proc.stderr.strip()[:400]}")
    return proc.stdout


def _handle_of(cli_output: str) -> int:
    """`sa add` prints one line per SA: the handle first."""
    return int(cli_output.split()[0], 16)


def _v1_entry(spi: int, key: bytes, **fields: Any) -> dict[str, Any]:
    """An inbound v1 SA (NULL + HMAC-SHA1-96: what V1_ADD_SA takes on the default card) in SA-file shape."""
    return {"spi": spi, "direction": "inbound", "cipher": {"alg": "null"},
            "integrity": {"alg": "hmac-sha1-96", "key": key.hex()}, **fields}


def cli_add_v1_transport(spec: dict[str, Any]) -> dict[str, Any]:
    """`sa add --v1` from flags: the filter's protocol and port from --sel-proto/--sel-dport, the key on stdin."""
    key = os.urandom(20)
    spi = int(spec["spi"])
    out = _cli(["sa", "add", "--v1", "--spi", hex(spi), "--dir", "in", "--src", NET.peer_v4, "--dst", NET.card_v4,
                "--sel-proto", "udp", "--sel-dport", str(spec["dport"]), "--key-file", "-"],
               stdin=f"cipher null:\nintegrity hmac-sha1-96:{key.hex()}\n")
    p = _sa(_v1_entry(spi, key, mode="transport", src=NET.peer_v4, dst=NET.card_v4,
                      selector={"proto": "udp", "dport": int(spec["dport"])}), Offload.CRYPTO_V1)
    return {"handle": _handle_of(out), "params": p, "key": key, "cli": out.strip()}


def cli_add_v1_tunnel(spec: dict[str, Any]) -> dict[str, Any]:
    """`sa add --sa FILE --v1`: a tunnel SA whose src/dst (the filter) are the inner connection."""
    key = os.urandom(20)
    entry = _v1_entry(int(spec["spi"]), key, mode="tunnel", src=NET.peer_inner_v4, dst=NET.card_inner_v4,
                      tunnel={"src": NET.peer_v4, "dst": NET.card_v4}, **_port_selector(spec))
    path = Path("/run/ipsec-nic-policy-sas.yaml")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # key material: owner only
    with os.fdopen(fd, "w") as f:
        json.dump({"sas": [entry]}, f)  # JSON is YAML
    try:
        out = _cli(["sa", "add", "--sa", str(path), "--v1"])
    finally:
        path.unlink()
    return {"handle": _handle_of(out), "params": _sa(entry, Offload.CRYPTO_V1), "key": key, "cli": out.strip()}


def _port_selector(spec: dict[str, Any]) -> dict[str, Any]:
    """``selector: {proto: udp, dport: N}`` for a case that also sends to another port (``other_port``)."""
    return {"selector": {"proto": "udp", "dport": int(spec["dport"])}} if spec.get("other_port") else {}


def _policy(src: str, dst: str, p: SaParams, reqid: int, tunnel: bool, upper: list[str] | None = None) -> list[str]:
    """The sender's `dir out` policy for ``src`` -> ``dst`` through SA ``p`` (its template's reqid)."""
    return ["xfrm", "policy", "add", "src", src, "dst", dst, *(upper or []), "dir", "out", "tmpl", "src", p.src,
            "dst", p.dst, "proto", "esp", "reqid", str(reqid), "mode", "tunnel" if tunnel else "transport"]


def _net24(addr: str) -> str:
    return str(ipaddress.ip_network(f"{addr}/24", strict=False))


def _send(netns: str, src: str, dst: str, dport: int, datagrams: list[bytes]) -> int:
    """UDP datagrams from (src, SPORT) in ``netns``; the kernel's XFRM policy there decides the ESP."""
    with in_netns(netns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((src, SPORT))
        sent = 0
        for d in datagrams:
            s.sendto(d, (dst, dport))
            sent += 1
            time.sleep(0.02)  # keep arrival order = send order on the card's RX ring
        return sent
    finally:
        s.close()


def _udp_of_ip(ip: bytes) -> dict[str, Any] | None:
    """Addresses, ports and payload of an IPv4 UDP packet (no options needed here)."""
    if len(ip) < 28 or ip[0] >> 4 != 4 or ip[9] != 17:
        return None
    ihl = (ip[0] & 0xF) * 4
    sport, dport, length, csum = struct.unpack_from("!HHHH", ip, ihl)
    return {"src": str(ipaddress.IPv4Address(ip[12:16])), "dst": str(ipaddress.IPv4Address(ip[16:20])),
            "sport": sport, "dport": dport, "csum": csum, "data": ip[ihl + 8:ihl + length].hex()}


def _classify(rec: dict[str, Any], pkt) -> dict[str, Any]:
    """What a received frame is: its outer IP addresses, ESP SPI (also inside UDP 4500), and the UDP
    datagram the card delivered (packet offload: the decapsulated frame) or the driver recovered
    (crypto offload: pkt.inner)."""
    frame = pkt.frame
    out: dict[str, Any] = {"flags": rec["flags"], "crypto_status": rec["crypto_status"], "handle": rec["handle"],
                           "note": pkt.note, "frame": rec["frame"], "inner": rec["inner"],
                           "policy_mismatch": bool(pkt.flags & RxWbFlags.POLICY_MISMATCH),
                           "crypto_done": bool(pkt.flags & RxWbFlags.CRYPTO_DONE),
                           "decapsulated": bool(pkt.flags & RxWbFlags.DECAPSULATED),
                           "l4_csum_ok": bool(pkt.flags & RxWbFlags.L4_CSUM_OK)}
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return out
    ip = frame[14:]
    ihl = (ip[0] & 0xF) * 4
    out["outer_src"] = str(ipaddress.IPv4Address(ip[12:16]))
    out["outer_dst"] = str(ipaddress.IPv4Address(ip[16:20]))
    proto = ip[9]
    esp_at = None
    if proto == 50:
        esp_at = ihl
    elif proto == 17 and struct.unpack_from("!H", ip, ihl + 2)[0] == 4500 and len(ip) >= ihl + 16:
        esp_at = ihl + 8
    if esp_at is not None:
        out["spi"] = struct.unpack_from("!I", ip, esp_at)[0]
        out["esp_at"] = 14 + esp_at
    if out["decapsulated"]:
        out["udp"] = _udp_of_ip(ip)
    elif pkt.inner is not None:
        out["udp"] = _udp_of_ip(pkt.inner[14:])
    return out


def _receive(card, want: int, on_wire: int, fw_rx_before: int, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
    """Every frame the card indicates until ``want`` of them carried an SPI or a UDP datagram of ours and
    the firmware has taken in at least the ``on_wire`` frames the peer sent (GET_STATS rx_packets: dropped
    ones too, so their counters are final), or the timeout; then a short grace period, so that a frame
    that should not be there is seen too."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    ours = 0
    settled = False
    while time.monotonic() < deadline:
        for pkt in card.recv(timeout=0.2, limit=64):
            rec = _classify(rx_record(pkt), pkt)
            got.append(rec)
            if "spi" in rec or rec.get("udp"):
                ours += 1
        if not settled and ours >= want and card.firmware_stats().rx_packets - fw_rx_before >= on_wire:
            settled = True
            deadline = min(deadline, time.monotonic() + 0.5)
    return got


def _icv_ok(frame: bytes, esp_at: int, key: bytes) -> bool:
    """HMAC-SHA1-96 (RFC 2404) over SPI .. next header equals the ICV: the frame is authentic, checked here
    without the card."""
    ip_total = struct.unpack_from("!H", frame, 16)[0]
    end = 14 + ip_total
    mac = hmac.new(key, frame[esp_at:end - SHA1_ICV], hashlib.sha1).digest()[:SHA1_ICV]
    return hmac.compare_digest(mac, frame[end - SHA1_ICV:end])


def _peer_states(netns: str = NET.netns) -> list[dict[str, Any]]:
    return [s.as_dict() for s in parse_state_stats(_ip(["-s", "xfrm", "state"], netns=netns))]


def _payloads(tag: str, n: int) -> list[bytes]:
    return [f"ipsec-nic policy {tag} #{i}".encode().ljust(48, b".") for i in range(n)]


class Run:
    def __init__(self, card, info: dict[str, Any]) -> None:
        self.card = card
        self.info = info
        self.iface = info["iface"]

    def _fresh_case(self) -> None:
        ip_batch(FLUSH_COMMANDS)
        self.card.recv(timeout=0.0, limit=256)  # nothing left over from the case before

    def _measure(self, fn) -> dict[str, Any]:
        before, fw_before = self.card.stats(), vars(self.card.firmware_stats()).copy()
        t0 = time.monotonic()
        result = fn()
        result["card_stats"] = {k: v for k, v in stats_delta(before, self.card.stats()).items() if v}
        result["fw_stats"] = {k: v - fw_before.get(k, 0) for k, v in vars(self.card.firmware_stats()).items()
                              if v != fw_before.get(k, 0)}
        result["seconds"] = round(time.monotonic() - t0, 2)
        handles = [h for h in (result.get("handle"), *result.get("handles", [])) if h]
        self.card.delete_sa(handles)
        result["card_sas_after"] = len(self.card.list_sas())
        return result

    # --- v1 transport filter with ports ------------------------------------------------------------

    def v1_transport(self, spec: dict[str, Any]) -> dict[str, Any]:
        self._fresh_case()
        added = spec["_added"]
        p, key, handle, spi = added["params"], added["key"], added["handle"], added["params"].spi
        fw_rx = self.card.firmware_stats().rx_packets
        # The peer: one state for any source (src 0.0.0.0), one policy for its /24.
        ip_batch([state_add(replace(p, src="0.0.0.0"), 1),
                  _policy(_net24(NET.peer_v4), f"{NET.card_v4}/32", replace(p, src="0.0.0.0"), 1, False)])
        sent = {}
        for name, src, dport, n in (("inside", NET.peer_v4, spec["dport"], spec["inside"]),
                                    ("other_port", NET.peer_v4, spec["dport"] + 1, spec["other_port"]),
                                    ("other_source", PEER2, spec["dport"], spec["other_source"])):
            sent[name] = {"src": src, "dport": dport,
                          "count": _send(NET.netns, src, NET.card_v4, dport, _payloads(name, n))}
        total = sum(v["count"] for v in sent.values())
        frames = _receive(self.card, total, total, fw_rx)
        for f in frames:
            if f.get("spi") == spi and "esp_at" in f:
                f["icv_ok_here"] = _icv_ok(bytes.fromhex(f["frame"]), f["esp_at"], key)
                f["plain_udp"] = _udp_of_ip(_esp_null_payload(bytes.fromhex(f["frame"]), f["esp_at"]))
        return {"handle": handle, "spi": spi, "cli": added["cli"], "sent": sent, "frames": frames,
                "peer_states": _peer_states()}

    # --- tunnel inner selectors: v1 crypto, packet offload, v2 crypto (host check) ------------------------

    def tunnel(self, spec: dict[str, Any]) -> dict[str, Any]:
        self._fresh_case()
        kind = spec["kind"]  # v1 | packet | v2
        fw_rx = self.card.firmware_stats().rx_packets
        spi = int(spec["spi"])
        entry: dict[str, Any] = {"spi": spi, "direction": "inbound", "mode": "tunnel", "src": NET.peer_inner_v4,
                                 "dst": NET.card_inner_v4, "tunnel": {"src": NET.peer_v4, "dst": NET.card_v4}}
        if kind == "v1":  # added through the guest CLI before this process opened the card
            p, handle = spec["_added"]["params"], spec["_added"]["handle"]
        else:
            entry.update(aead={"alg": "aes-gcm-128", "key": _rand(16), "salt": _rand(4), "icv": 16},
                         **_port_selector(spec))
            p = _sa(entry, Offload.PACKET if kind == "packet" else Offload.CRYPTO)
            handle = self.card.add_sa(p, offload="packet" if kind == "packet" else "crypto")
        # A Linux tunnel state without `sel` takes any inner packet its policy gives it (the selector is the
        # policy's): the /24 policy sends the spoofed inner source through the same SA.
        ip_batch([state_add(p, 1), _policy(_net24(NET.peer_inner_v4), f"{NET.card_inner_v4}/32", p, 1, True)])
        sent = {}
        dport = int(spec["dport"])
        for name, src, port, n in (("inside", NET.peer_inner_v4, dport, spec["inside"]),
                                   ("spoofed", SPOOF, dport, spec["spoofed"]),
                                   ("other_port", NET.peer_inner_v4, dport + 1, spec.get("other_port", 0))):
            sent[name] = {"src": src, "dport": port,
                          "count": _send(NET.netns, src, NET.card_inner_v4, port, _payloads(f"{kind}-{name}", n))}
        on_wire = sum(v["count"] for v in sent.values())
        frames = _receive(self.card, sent["inside"]["count"] if kind == "packet" else on_wire, on_wire, fw_rx)
        out = {"handle": handle, "spi": spi, "sent": sent, "frames": frames, "peer_states": _peer_states()}
        if kind == "v1":
            out["cli"] = spec["_added"]["cli"]
        return out

    # --- NAT-T transport checksum through a real NAT ------------------------------------------------------

    def _nat_setup(self) -> dict[str, Any]:
        _sh(["modprobe", "-q", "-a", "veth", "sch_ingress", "cls_u32", "act_nat"], check=False)
        if not Path(f"/run/netns/{NAT_NS}").exists():
            _ip(["netns", "add", NAT_NS], netns=None)
            _ip(["link", "add", "natv0", "netns", NET.netns, "type", "veth", "peer", "name", "natv1", "netns",
                 NAT_NS], netns=None)
            ip_batch([["link", "set", "lo", "up"], ["link", "set", "natv1", "up"],
                      ["addr", "add", f"{NAT_PRIVATE}/24", "dev", "natv1"],
                      ["route", "add", "default", "via", NAT_GW]], NAT_NS)
            ip_batch([["link", "set", "natv0", "up"], ["addr", "add", f"{NAT_GW}/24", "dev", "natv0"]])
            _sh(["ip", "netns", "exec", NET.netns, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
            # RFC 3022 basic NAT, stateless: the outer source of what leaves the peer's NIC becomes public.
            tc = ["ip", "netns", "exec", NET.netns, "tc"]
            _sh([*tc, "qdisc", "add", "dev", self.iface, "clsact"])
            # u32 picks only the private source, so the filter's hit count is the number of translations.
            _sh([*tc, "filter", "add", "dev", self.iface, "egress", "protocol", "ip", "prio", "10", "u32", "match",
                 "ip", "src", f"{NAT_PRIVATE}/32", "action", "nat", "egress", f"{NAT_PRIVATE}/32", NET.peer_v4])
        return {"tc": _sh(["ip", "netns", "exec", NET.netns, "tc", "-s", "filter", "show", "dev", self.iface,
                           "egress"])}

    def natt(self, spec: dict[str, Any]) -> dict[str, Any]:
        self._fresh_case()
        nat = self._nat_setup()
        ip_batch(FLUSH_COMMANDS, NAT_NS)
        out: dict[str, Any] = {"tc_before": nat["tc"], "rounds": {}}
        commands: list[list[str]] = []
        handles = {}
        for reqid, (kind, spi, dport) in enumerate((("crypto", spec["spi"], spec["dport"]),
                                                    ("packet", spec["spi"] + 1, spec["dport"] + 1)), start=1):
            aead = {"alg": "aes-gcm-128", "key": _rand(16), "salt": _rand(4), "icv": 16}
            encap = {"type": "udp", "sport": 4500, "dport": 4500}
            # The card's SA names the public address: what it sees after the NAT.
            card_sa = _sa({"spi": spi, "direction": "inbound", "mode": "transport", "src": NET.peer_v4,
                           "dst": NET.card_v4, "encap": encap, "aead": aead},
                          Offload.PACKET if kind == "packet" else Offload.CRYPTO)
            handles[kind] = self.card.add_sa(card_sa, offload=kind)
            # The sender behind the NAT knows only its private address.
            private = replace(card_sa, src=NAT_PRIVATE)
            commands += [state_add(private, reqid),
                         _policy(f"{NAT_PRIVATE}/32", f"{NET.card_v4}/32", private, reqid, False,
                                 ["proto", "udp", "dport", str(dport)])]
            out["rounds"][kind] = {"handle": handles[kind], "spi": spi, "dport": dport}
        ip_batch(commands, NAT_NS)
        fw_rx = self.card.firmware_stats().rx_packets
        total = 0
        for kind, r in out["rounds"].items():
            r["sent"] = _send(NAT_NS, NAT_PRIVATE, NET.card_v4, r["dport"], _payloads(f"natt-{kind}", spec["count"]))
            total += r["sent"]
        out["frames"] = _receive(self.card, total, total, fw_rx)
        out["natin_states"] = _peer_states(NAT_NS)
        out["tc_after"] = _sh(["ip", "netns", "exec", NET.netns, "tc", "-s", "filter", "show", "dev", self.iface,
                               "egress"])
        ip_batch(FLUSH_COMMANDS, NAT_NS)
        out["handles"] = list(handles.values())
        return out

    def cleanup(self) -> None:
        ip_batch(FLUSH_COMMANDS)


def _esp_null_payload(frame: bytes, esp_at: int) -> bytes:
    """The IPv4 packet an ESP-NULL (RFC 2410) transport frame carries, rebuilt without the card: the outer
    header with the trailer's next header, then the payload (a frame indicated unprocessed is still
    readable, so the test can see which port it was for)."""
    ip_total = struct.unpack_from("!H", frame, 16)[0]
    end = 14 + ip_total - SHA1_ICV
    pad, nh = frame[end - 2], frame[end - 1]
    data = frame[esp_at + ESP_HDR:end - 2 - pad]
    ihl = (frame[14] & 0xF) * 4
    head = bytearray(frame[14:14 + ihl])
    struct.pack_into("!H", head, 2, ihl + len(data))
    head[9] = nh
    return bytes(head) + data


def _with_addresses(run: Run) -> None:
    """The peer's second address (outside a filter naming 10.0.0.2) and a spoofable inner source."""
    for argv in (["addr", "replace", f"{PEER2}/32", "dev", run.iface],
                 ["addr", "replace", f"{SPOOF}/32", "dev", "lo"]):
        _ip(argv)


def check_all(spec: dict[str, Any]) -> dict[str, Any]:
    """Every case in one process and one card handle. The v1 SAs go on first, through the guest CLI in
    processes of their own (flags, and an SA file); this process then opens the card without a reset and
    finds them (their host state is in /run/ipsec-nic/<bdf>.json)."""
    from guest_tools.driver import open_card

    info = setup()
    open_card(reset=True).close()  # no SAs, statistics at zero
    cases = {name: dict(case) for name, case in spec["cases"].items()}
    for case in cases.values():
        if case["check"] == "v1_transport":
            case["_added"] = cli_add_v1_transport(case)
        elif case["check"] == "tunnel" and case["kind"] == "v1":
            case["_added"] = cli_add_v1_tunnel(case)
    card = open_card(reset=False)
    run = Run(card, info)
    out: dict[str, Any] = {"setup": info, "card_sas_at_open": len(card.list_sas())}
    try:
        _with_addresses(run)
        out["peer_addrs"] = re.findall(r"inet (\S+)", _ip(["-4", "addr", "show"]))
        for name, case in cases.items():
            method = {"v1_transport": run.v1_transport, "tunnel": run.tunnel, "natt": run.natt}[case["check"]]
            out[name] = run._measure(lambda m=method, c=case: m(c))
        run.cleanup()
    finally:
        card.close()
    return out


CHECKS = {"all": check_all}

if __name__ == "__main__":
    raise SystemExit(main(CHECKS))
