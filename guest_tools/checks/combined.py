"""Guest check: transport over tunnel between the card and the Linux XFRM peer (run by
tests/vm/test_transport_over_tunnel.py, on a card whose profile offers transport_tunnel_combined).

    python3 -m guest_tools.checks.combined roundtrip SPEC

The topology is guest_tools/scenario.py's (netns ``peer`` around the virtio-net NIC, set up once per boot).
The card gets four crypto-offload SAs: per direction a transport SA between the end hosts (NET's inner
addresses) and a tunnel SA between the gateways (NET's outer addresses) whose selector is those end hosts.
The peer gets the mirrored states and, per direction, ONE policy with two templates, transport then tunnel
(guest_tools/xfrm_peer.py transport_over_tunnel_commands). Card -> peer: the driver sends with the transport
SA as the handle and the tunnel SA as TxDesc.tunnel_handle; the peer's kernel opens both layers and its
socket gets the datagrams. Peer -> card: the peer's kernel seals both layers; the card indicates each frame.

SPEC: {"name": str, "family": 4 | 6, "count": int, "size": int, "spi_base": int,
"peer_inner_keys": "same" | "different", "udp": None | "tunnel" | "transport", "peer_flow_policy": bool,
"inner_alg": ALGORITHMS name, "outer_alg": ALGORITHMS name, "timeout": seconds, "cli": bool}. With "cli"
one datagram each way also goes through the command line (`send --tunnel-sa`, `recv --json`). With "different" the
peer's two transport states get other keys than the card's (a negative: the tunnel layer still verifies).
With "udp" one layer is UDP-encapsulated (RFC 3948, port 4500) on both sides: "tunnel" = the tunnel SAs
(NDIS UdpEsp TRANSPORT_OVER_TUNNEL, "transport over UDP-encapsulated tunnel"), "transport" = the transport
SAs (UDP_ESP_TRANSPORT_OVER_TUNNEL, "UDP-encapsulated transport over tunnel"). The peer's states then carry
`encap espinudp 4500 4500`, and a UDP_ENCAP_ESPINUDP socket on port 4500 in netns `peer` hands the
ESP-in-UDP it receives to XFRM (net/ipv4/xfrm4_input.c xfrm4_udp_encap_rcv): for "tunnel" the outer
datagram, for "transport" the inner one, which arrives there after the tunnel state decapsulated it.
The result is what was observed (statuses, handles, digests, counters); the host test judges it.
"""

from __future__ import annotations

import copy
import socket
import time
from collections import Counter
from typing import Any

from device.contract.regs import Features
from guest_tools import packets
from guest_tools.checks.common import main
from guest_tools.driver import open_card
from guest_tools.scenario import (
    ALGORITHMS,
    C2P_DPORT,
    C2P_SPORT,
    NAT_T_PORT,
    NET,
    P2C_DPORT,
    P2C_SPORT,
    SOL_UDP,
    UDP_ENCAP,
    UDP_ENCAP_ESPINUDP,
    XFRM_POLICY_IN,
    XFRM_POLICY_OUT,
    _ip,
    bypass_policy,
    card_sas,
    fill_keys,
    in_netns,
    ip_batch,
    parse_udp_frame,
    payload,
    payload_digest,
    peer_datagrams,
    peer_xfrm_stat,
    setup,
)
from guest_tools.xfrm_peer import FLUSH_COMMANDS, parse_state_stats, transport_over_tunnel_commands

# SPIs (+ spec spi_base): the card's outbound transport / tunnel SA, then its inbound pair
T_OUT, U_OUT, T_IN, U_IN = 0x3100, 0x3200, 0x3300, 0x3400


def _family(spec: dict[str, Any]) -> int:
    return int(spec.get("family", 4))


def sa_document(spec: dict[str, Any]) -> dict[str, Any]:
    """The card's four SAs in the SA-file shape (device.contract.sa_file), without keys, in the order
    outbound transport, outbound tunnel, inbound transport, inbound tunnel."""
    base = int(spec.get("spi_base", 0))
    card_host, peer_host = NET.addrs(_family(spec), tunnel=True)
    card_gw, peer_gw = NET.addrs(_family(spec), tunnel=False)
    inner = ALGORITHMS[spec.get("inner_alg", "aes-cbc-128+hmac-sha256-128")]
    outer = ALGORITHMS[spec.get("outer_alg", "aes-gcm-128")]
    udp = spec.get("udp")
    encap = {"type": "udp", "sport": NAT_T_PORT, "dport": NAT_T_PORT}
    t_encap = {"encap": dict(encap)} if udp == "transport" else {}
    u_encap = {"encap": dict(encap)} if udp == "tunnel" else {}
    sas = []
    for direction, t_spi, u_spi, src, dst, gw_src, gw_dst in (
        ("outbound", T_OUT, U_OUT, card_host, peer_host, card_gw, peer_gw),
        ("inbound", T_IN, U_IN, peer_host, card_host, peer_gw, card_gw),
    ):
        sas.append({"spi": t_spi + base, "direction": direction, "mode": "transport", "src": src, "dst": dst,
                    **copy.deepcopy(inner), **copy.deepcopy(t_encap)})
        sas.append({"spi": u_spi + base, "direction": direction, "mode": "tunnel", "src": src, "dst": dst,
                    "tunnel": {"src": gw_src, "dst": gw_dst}, **copy.deepcopy(outer), **copy.deepcopy(u_encap)})
    return {"sas": sas}


def _peer_doc(doc: dict[str, Any], different_inner: bool) -> dict[str, Any]:
    """The peer's copy: the card's keys, or fresh ones for the two transport SAs."""
    if not different_inner:
        return doc
    peer = copy.deepcopy(doc)
    for sa in peer["sas"]:
        if sa["mode"] == "transport":
            for section in ("aead", "cipher", "integrity"):
                if section in sa:
                    sa[section].pop("key", None)
                    sa[section].pop("salt", None)
    return fill_keys(peer)


def _card_to_peer(card, spec: dict[str, Any], handles: dict[str, int], info: dict[str, Any],
                  rx: socket.socket) -> dict[str, Any]:
    name, count, size = spec["name"], int(spec["count"]), int(spec["size"])
    card_host, peer_host = NET.addrs(_family(spec), tunnel=True)
    dst_mac, src_mac = packets.parse_mac(info["peer_mac"]), packets.parse_mac(info["card_mac"])
    statuses: Counter[str] = Counter()
    error = ""
    try:
        for i in range(count):
            data = payload(name, "card-to-peer", i, size)
            frame = packets.ethernet(dst_mac, src_mac,
                                     packets.udp_packet(card_host, peer_host, C2P_SPORT, C2P_DPORT, data))
            card.send(frame, handles["t_out"], "crypto", tunnel_handle=handles["u_out"])
        for c in card.flush_tx():
            statuses[c.status_name] += 1
    except Exception as exc:  # a refusal is an observation for the host
        error = f"{type(exc).__name__}: {exc}"
    got = peer_datagrams(rx, (card_host, C2P_SPORT), count, float(spec.get("timeout", 8.0)))
    return {"tx_status": dict(statuses), "error": error, "received": len(got), "digest": payload_digest(got),
            "matched": sum(1 for i, g in enumerate(got) if g == payload(name, "card-to-peer", i, size))}


def _peer_to_card(card, spec: dict[str, Any], tx: socket.socket) -> dict[str, Any]:
    name, count, size = spec["name"], int(spec["count"]), int(spec["size"])
    card_host, peer_host = NET.addrs(_family(spec), tunnel=True)
    for i in range(count):
        tx.sendto(payload(name, "peer-to-card", i, size), (card_host, P2C_DPORT))
    frames: list[dict[str, Any]] = []
    delivered: list[bytes] = []
    other = 0
    deadline = time.monotonic() + float(spec.get("timeout", 8.0))
    while len(frames) < count and time.monotonic() < deadline:
        for pkt in card.recv(timeout=min(0.5, max(0.0, deadline - time.monotonic())), limit=64):
            if not pkt.crypto_done:
                other += 1  # not IPsec (IPv6 MLD and the like)
                continue
            dgram = parse_udp_frame(pkt.inner) if pkt.inner is not None else None
            valid = (dgram is not None and (dgram.src, dgram.dst, dgram.sport, dgram.dport)
                     == (peer_host, card_host, P2C_SPORT, P2C_DPORT))
            if valid:
                delivered.append(dgram.data)
            frames.append({"crypto_done": pkt.crypto_done, "next_crypto_done": pkt.next_crypto_done,
                           "l4_csum_ok": pkt.l4_csum_ok,
                           "crypto_status": pkt.crypto_status_name, "tunnel_status": pkt.tunnel_status_name,
                           "transport_status": pkt.transport_status_name, "handle": pkt.handle,
                           "next_handle": pkt.next_handle, "inner": pkt.inner is not None, "valid": valid,
                           "note": pkt.note})
    return {"frames": frames, "other_frames": other, "delivered": len(delivered),
            "digest": payload_digest(delivered),
            "matched": sum(1 for i, g in enumerate(delivered) if g == payload(name, "peer-to-card", i, size))}


def _cli(card, spec: dict[str, Any], handles: dict[str, int], info: dict[str, Any], rx: socket.socket,
         tx: socket.socket) -> dict[str, Any]:
    """The same path through the command line (guest_tools.cli on this process's card handle):
    `send --sa T --tunnel-sa U` one datagram to the peer, then `recv --json` one datagram from it."""
    import io
    import json

    from guest_tools import cli

    card_host, peer_host = NET.addrs(_family(spec), tunnel=True)
    out = io.StringIO()
    session = cli.Session(opener=lambda a, reset: card, out=out)
    argv = ["send", "--src", card_host, "--dst", peer_host, "--sport", str(C2P_SPORT), "--dport", str(C2P_DPORT),
            "--size", "64", "--dst-mac", info["peer_mac"], "--sa", hex(handles["t_out"]),
            "--tunnel-sa", hex(handles["u_out"])]
    result: dict[str, Any] = {"send_status": cli.run_one(session, argv), "send_output": out.getvalue().strip()}
    got = peer_datagrams(rx, (card_host, C2P_SPORT), 1, 5.0)
    result["peer_got"] = got[0].hex() if got else None
    tx.sendto(CLI_PAYLOAD, (card_host, P2C_DPORT))
    result["recv"] = None
    for _ in range(4):  # frames that are not IPsec (IPv6 MLD) may come first: one per `recv`
        before = len(out.getvalue())
        status = cli.run_one(session, ["recv", "--count", "1", "--timeout", "3", "--json"])
        line = out.getvalue()[before:].strip()
        record = json.loads(line) if status == cli.EXIT_OK and line else None
        if record is not None and record["crypto_done"]:
            result["recv"] = record
            break
    session.card = None  # the card stays this check's to close
    return result


CLI_PAYLOAD = b"through the command line " * 3


def _encap_socket(fam: int, bypass: bool) -> socket.socket:
    """Linux opens ESP-in-UDP only on a socket with UDP_ENCAP_ESPINUDP bound to the port (RFC 3948;
    net/ipv4/udp.c udp_lib_setsockopt UDP_ENCAP, xfrm4_udp_encap_rcv), as IKE daemons do. With ``bypass``
    its traffic bypasses the policies (an IKE socket's usual setting). Not for a UDP-encapsulated transport
    layer: that datagram reaches the socket after the tunnel state opened it, and the socket's policy check
    runs before the ESP-in-UDP is opened (udp_queue_rcv_one_skb), so an allow-all socket policy without
    templates rejects the tunnel entry in its secpath (XfrmInTmplMismatch); the peer's own policy for that
    flow admits it (xfrm_peer.transport_over_tunnel_commands). Call inside netns `peer`."""
    s = socket.socket(fam, socket.SOCK_DGRAM)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.setsockopt(SOL_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP)
    family = 4 if fam == socket.AF_INET else 6
    for direction in (XFRM_POLICY_IN, XFRM_POLICY_OUT) if bypass else ():
        s.setsockopt(*bypass_policy(family, direction))
    s.bind(("0.0.0.0" if fam == socket.AF_INET else "::", NAT_T_PORT))
    return s


def roundtrip(spec: dict[str, Any]) -> dict[str, Any]:
    info = setup()
    doc = fill_keys(sa_document(spec))
    t_out, u_out, t_in, u_in = card_sas(doc)
    pt_out, pu_out, pt_in, pu_in = card_sas(_peer_doc(doc, spec.get("peer_inner_keys") == "different"))
    ip_batch(FLUSH_COMMANDS)
    stat_before = peer_xfrm_stat()
    card = open_card(reset=True)  # CTRL.RESET: no SAs, statistics at zero
    socks: list[socket.socket] = []
    out: dict[str, Any] = {"features": card.features(), "udp_esp_register": card.ident.udp_esp,
                           "caps_transport_tunnel_combined": card.caps().transport_tunnel_combined,
                           "offers": card.offers(Features.TRANSPORT_TUNNEL_COMBINED)}
    try:
        handles = {"t_out": card.add_sa(t_out), "u_out": card.add_sa(u_out), "t_in": card.add_sa(t_in),
                   "u_in": card.add_sa(u_in)}
        out["handles"] = handles
        out["spis"] = {"t_out": t_out.spi, "u_out": u_out.spi, "t_in": t_in.spi, "u_in": u_in.spi}
        if spec.get("udp"):
            # test keys of this run, so the host can open the tunnel layer it captured and see where the
            # UDP header is (the transport layer's UDP only shows inside it)
            out["tunnel_keys"] = {"u_out": u_out.enc_key.hex(), "u_in": u_in.enc_key.hex()}
        peer = transport_over_tunnel_commands(pt_out, pu_out, 1) + transport_over_tunnel_commands(pt_in, pu_in, 3)
        if spec.get("peer_flow_policy") is False:  # evidence: what Linux does without the encap-flow policy
            peer = [c for c in peer if not (c[:3] == ["xfrm", "policy", "add"] and "proto" in c[:8])]
        ip_batch(peer)
        out["peer_policies"] = _ip(["xfrm", "policy"]).count("tmpl ")  # template lines, no keys in them
        _, peer_host = NET.addrs(_family(spec), tunnel=True)
        fam = socket.AF_INET if _family(spec) == 4 else socket.AF_INET6
        with in_netns(NET.netns):
            rx = socket.socket(fam, socket.SOCK_DGRAM)
            socks.append(rx)
            rx.bind((peer_host, C2P_DPORT))
            rx.setblocking(False)
            tx = socket.socket(fam, socket.SOCK_DGRAM)
            socks.append(tx)
            tx.bind((peer_host, P2C_SPORT))
            if spec.get("udp"):
                socks.append(_encap_socket(fam, bypass=spec["udp"] == "tunnel"))
        out["card_to_peer"] = _card_to_peer(card, spec, handles, info, rx)
        out["peer_to_card"] = _peer_to_card(card, spec, tx)
        out["peer_states"] = [s.as_dict() for s in parse_state_stats(_ip(["-s", "xfrm", "state"]))]
        after = peer_xfrm_stat()
        out["xfrm_stat_delta"] = {k: v - stat_before.get(k, 0) for k, v in after.items()
                                  if v != stat_before.get(k, 0)}
        out["card_stats"] = card.stats()
        out["firmware_stats"] = dict(vars(card.firmware_stats()))
        out["host_next_seq"] = {k: card.host.get(h).next_seq for k, h in handles.items() if k.endswith("_out")}
        if spec.get("cli"):  # after the counters above, which count the driver's datagrams only
            out["cli"] = _cli(card, spec, handles, info, rx, tx)
        out["deleted"] = card.delete_all()
    finally:
        for s in socks:
            s.close()
        card.close()
        ip_batch(FLUSH_COMMANDS)
    return out


CHECKS = {"roundtrip": roundtrip}

if __name__ == "__main__":
    raise SystemExit(main(CHECKS))
