"""A Linux XFRM peer for the card: the same SAs the card holds, configured with `ip xfrm` in a netns.

The peer is the independent party in the interop tests and the demo: its kernel (esp4/esp6, ah4/ah6, the
crypto API) encrypts and decrypts, so nothing written here decides whether the card's ESP is right.

Mirroring. An SA describes one flow on the wire (src -> dst, SPI). Linux XFRM states are keyed by
(dst, SPI, proto) and are not directional; direction lives in the policies. So the peer adds a state
with the card's very parameters, and a policy of the opposite direction: the card's outbound SA is
the peer's ``dir in`` policy, the card's inbound SA the peer's ``dir out``. Sequence numbers follow
the same rule: the card's outbound ``seq`` (last number sent) becomes the peer's receive window
position (``replay-seq``/``replay-seq-hi``), the card's inbound ``seq`` (window start) becomes the
peer's output counter (``replay-oseq``/``replay-oseq-hi``) so its first packet is seq + 1
(iproute2 ip/xfrm_state.c; man ip-xfrm(8)).

Everything here is pure (argv lists and text parsing), so the host unit-tests it; the guest runs the
commands through ``ip -n NETNS -batch -`` (one process for many commands) in guest_tools/scenario.py.
Argv elements never contain whitespace, so a batch line is the argv joined with spaces.
Key material appears only in the generated commands, never in parsed output or messages.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from device.contract.enums import AuthAlg, Direction, EncAlg, IpProto, Mode
from device.contract.sa import SaParams

DEFAULT_NETNS = "peer"
DEFAULT_REPLAY_WINDOW = 128  # the peer's inbound window when the card's SA does not say (ESN needs one)

# Linux crypto API names (tools/testing/selftests/net/ipsec.c lists the same names and key sizes).
_AEAD_ENC = {EncAlg.AES_GCM_128, EncAlg.AES_GCM_192, EncAlg.AES_GCM_256}
_CBC_NAMES = {
    EncAlg.AES_CBC_128: "cbc(aes)",
    EncAlg.AES_CBC_192: "cbc(aes)",
    EncAlg.AES_CBC_256: "cbc(aes)",
    EncAlg.TDES_CBC: "cbc(des3_ede)",
    EncAlg.DES_CBC: "cbc(des)",
}
_HMAC_NAMES = {AuthAlg.MD5: "hmac(md5)", AuthAlg.SHA1: "hmac(sha1)", AuthAlg.SHA256: "hmac(sha256)"}
_GMAC = {AuthAlg.AES_GMAC_128, AuthAlg.AES_GMAC_192, AuthAlg.AES_GMAC_256}


class PeerConfigError(ValueError):
    """The SA cannot be expressed for the Linux peer (message names the SPI, never a key)."""


def _hex(key: bytes) -> str:
    return "0x" + key.hex() if key else '""'


def algorithm_args(p: SaParams) -> list[str]:
    """`ip xfrm state` ALGO-LIST for the SA: aead | enc [+ auth-trunc] | auth-trunc alone (NULL enc, AH)."""
    icv_bits = str(p.icv_len * 8)
    if p.proto == IpProto.AH:
        if p.enc_alg != EncAlg.NONE:
            raise PeerConfigError(f"SA {p.spi:#x}: AH carries no cipher")
        if p.auth_alg in _HMAC_NAMES:
            return ["auth-trunc", _HMAC_NAMES[p.auth_alg], _hex(p.auth_key), icv_bits]
        # Linux AH takes auth/auth-trunc algorithms only: net/xfrm/xfrm_user.c verify_newsa_info refuses
        # XFRMA_ALG_AEAD for IPPROTO_AH, and xfrm_algo.c's aalg list has no GMAC (RFC 4543 is ESP-only there).
        raise PeerConfigError(f"SA {p.spi:#x}: AH with {p.auth_alg.name} has no Linux counterpart "
                              "(Linux AH takes HMAC integrity only)")
    if p.proto != IpProto.ESP:
        raise PeerConfigError(f"SA {p.spi:#x}: the peer mirrors ESP and AH SAs only")
    if p.enc_alg in _AEAD_ENC:
        # RFC 4106 §8.1: the 4-byte salt follows the key; iproute2 takes them as one blob.
        return ["aead", "rfc4106(gcm(aes))", _hex(p.enc_key), icv_bits]
    if p.enc_alg == EncAlg.NONE and p.auth_alg in _GMAC:
        return ["aead", "rfc4543(gcm(aes))", _hex(p.auth_key), icv_bits]  # RFC 4543 ENCR_NULL_AUTH_AES_GMAC
    args: list[str] = []
    if p.enc_alg in _CBC_NAMES:
        args += ["enc", _CBC_NAMES[p.enc_alg], _hex(p.enc_key)]
    elif p.enc_alg == EncAlg.NONE:
        args += ["enc", "ecb(cipher_null)", '""']
    else:
        raise PeerConfigError(f"SA {p.spi:#x}: encryption {p.enc_alg.name} has no Linux counterpart here")
    if p.auth_alg in _HMAC_NAMES:
        args += ["auth-trunc", _HMAC_NAMES[p.auth_alg], _hex(p.auth_key), icv_bits]
    elif p.auth_alg != AuthAlg.NONE:
        raise PeerConfigError(f"SA {p.spi:#x}: integrity {p.auth_alg.name} cannot follow a CBC cipher")
    return args


def _proto_name(p: SaParams) -> str:
    return "ah" if p.proto == IpProto.AH else "esp"


def _prefix(addr: str) -> str:
    ip = ipaddress.ip_address(addr)
    return f"{ip}/{ip.max_prefixlen}"


def peer_policy_dir(p: SaParams) -> str:
    """The peer's policy direction for the card's SA: the opposite end of the same flow."""
    return "in" if p.direction == Direction.OUTBOUND else "out"


def state_add(p: SaParams, reqid: int, replay_window: int | None = None, mode: Mode | None = None) -> list[str]:
    """argv (after `ip`) that adds the peer's copy of the card's SA ``p``; ``mode`` overrides the SA's mode
    (the AH half of a tunnel-mode ESP+AH bundle is a transport state over the outer header)."""
    mode_name = "tunnel" if (p.mode if mode is None else mode) == Mode.TUNNEL else "transport"
    if p.proto == IpProto.AH and p.encap is not None:
        raise PeerConfigError(f"SA {p.spi:#x}: UDP encapsulation is for ESP only (RFC 3948)")
    window = replay_window if replay_window is not None else (p.replay_window or DEFAULT_REPLAY_WINDOW)
    argv = ["xfrm", "state", "add", "src", p.src, "dst", p.dst, "proto", _proto_name(p), "spi", f"{p.spi:#x}",
            "reqid", str(reqid), "mode", mode_name, "replay-window", str(window)]
    # RFC 4302 §3.3.3.2.1: IPv4 AH is padded to 32 bits (the card's framing). Linux's ah4 pads to 64 bits and
    # refuses any other header length unless the state has XFRM_STATE_ALIGN4 (net/ipv4/ah4.c ah_input).
    flags = (["esn"] if p.esn else []) + \
        (["align4"] if p.proto == IpProto.AH and ipaddress.ip_address(p.dst).version == 4 else [])
    if flags:
        argv += ["flag", *flags]
    lo, hi = p.seq & 0xFFFF_FFFF, p.seq >> 32
    if p.direction == Direction.OUTBOUND:
        # The card sends; the peer receives. Put its window where the card's numbering starts, or ESN
        # inference (RFC 4303 App. A2) would guess the wrong high half near 2^32.
        if p.seq:
            argv += ["replay-seq", f"{lo:#x}"] + (["replay-seq-hi", f"{hi:#x}"] if p.esn else [])
    elif p.seq:
        argv += ["replay-oseq", f"{lo:#x}"] + (["replay-oseq-hi", f"{hi:#x}"] if p.esn else [])
    argv += algorithm_args(p)
    if p.encap is not None:
        oaddr = "0.0.0.0" if ipaddress.ip_address(p.dst).version == 4 else "::"
        argv += ["encap", "espinudp", str(p.encap.sport), str(p.encap.dport), oaddr]
    return argv


def selector(p: SaParams) -> tuple[str, str]:
    """Traffic selector of the SA: the endpoints (transport) or the inner addresses (tunnel)."""
    if p.mode == Mode.TUNNEL:
        if not p.inner_src or not p.inner_dst:
            raise PeerConfigError(f"SA {p.spi:#x}: a tunnel SA needs inner src and dst for the peer's policy")
        return p.inner_src, p.inner_dst
    return p.src, p.dst


def _tmpl(p: SaParams, reqid: int, mode: Mode) -> list[str]:
    return ["tmpl", "src", p.src, "dst", p.dst, "proto", _proto_name(p), "reqid", str(reqid), "mode",
            "tunnel" if mode == Mode.TUNNEL else "transport"]


def policy_add(p: SaParams, reqid: int, ah: SaParams | None = None, ah_reqid: int | None = None) -> list[str]:
    """argv (after `ip`) for the peer's policy that sends or accepts the flow through the state; with
    ``ah`` a second template makes it an ESP-then-AH bundle (see bundle_commands)."""
    src, dst = selector(p)
    argv = ["xfrm", "policy", "add", "src", _prefix(src), "dst", _prefix(dst), "dir", peer_policy_dir(p),
            *_tmpl(p, reqid, p.mode)]
    if ah is not None:
        argv += _tmpl(ah, ah_reqid if ah_reqid is not None else reqid + 1, Mode.TRANSPORT)
    return argv


def check_bundle(esp: SaParams, ah: SaParams) -> None:
    """An ESP-then-AH bundle (NDIS v1 SecAssoc order, v2 NumExtHdrs 2) shares direction, endpoints and
    family; refuse anything else with the SPIs named."""
    where = f"bundle ESP {esp.spi:#x} + AH {ah.spi:#x}"
    if esp.proto != IpProto.ESP or ah.proto != IpProto.AH:
        raise PeerConfigError(f"{where}: needs an ESP SA first and an AH SA second")
    if (esp.direction, esp.src, esp.dst) != (ah.direction, ah.src, ah.dst):
        raise PeerConfigError(f"{where}: the two SAs must share direction, src and dst")


def bundle_commands(esp: SaParams, ah: SaParams, reqid: int) -> list[list[str]]:
    """The peer's states and one two-template policy for an ESP-then-AH bundle.

    Templates are listed innermost first (Linux applies xfrm_tmpl_resolve's order outbound and checks it
    inbound, net/xfrm/xfrm_policy.c xfrm_policy_ok), so ``tmpl esp`` then ``tmpl ah`` gives
    IP | AH | ESP | payload, RFC 4301 §4.5 transport adjacency. A tunnel-mode bundle is ESP in tunnel
    mode with AH in transport mode over the outer header (one outer IP header: IP | AH | ESP | inner IP),
    whatever mode the AH SA itself names."""
    check_bundle(esp, ah)
    return [state_add(esp, reqid), state_add(ah, reqid + 1, mode=Mode.TRANSPORT),
            policy_add(esp, reqid, ah=ah, ah_reqid=reqid + 1)]


def transport_over_tunnel_commands(transport: SaParams, tunnel: SaParams, reqid: int) -> list[list[str]]:
    """The peer's two states and one two-template policy for transport over tunnel (the card's
    TxDesc.tunnel_handle / NEXT_CRYPTO_DONE pair, datasheet §7.3, §7.6).

    Templates innermost first, as for bundle_commands: ``tmpl`` transport (the end hosts) then ``tmpl``
    tunnel (the gateways) gives outer IP | ESP(tunnel) | inner IP | ESP(transport) | payload outbound,
    and inbound the secpath (tunnel state first, then transport) is checked against the same list.
    The policy selector is the transport SA's endpoints, which the tunnel SA's selector must cover."""
    where = f"transport {transport.spi:#x} over tunnel {tunnel.spi:#x}"
    if transport.proto != IpProto.ESP or tunnel.proto != IpProto.ESP:
        raise PeerConfigError(f"{where}: both layers must be ESP")
    if transport.mode != Mode.TRANSPORT or tunnel.mode != Mode.TUNNEL:
        raise PeerConfigError(f"{where}: needs a transport-mode SA inside a tunnel-mode SA")
    if transport.direction != tunnel.direction:
        raise PeerConfigError(f"{where}: the two SAs must share a direction")
    if (transport.src, transport.dst) != selector(tunnel):
        raise PeerConfigError(f"{where}: the tunnel's selector must be the transport SA's endpoints")
    policy = policy_add(transport, reqid) + _tmpl(tunnel, reqid + 1, Mode.TUNNEL)
    commands = [state_add(transport, reqid), state_add(tunnel, reqid + 1), policy]
    if transport.encap is not None and peer_policy_dir(transport) == "in":
        # UDP-encapsulated transport inside the tunnel (NDIS UDP_ESP_TRANSPORT_OVER_TUNNEL). Linux checks the
        # inbound policy at the UDP_ENCAP socket *before* it opens the ESP-in-UDP (net/ipv4/udp.c
        # udp_queue_rcv_one_skb: xfrm4_policy_check, then encap_rcv), when only the tunnel state is in the
        # secpath: the two-template policy fails there (XfrmInTmplMismatch), and so does a socket bypass
        # policy (a tunnel-mode secpath entry no template covers). A policy for the encapsulated flow (UDP
        # between the end hosts on the encap ports) with the tunnel template alone admits it and marks that
        # secpath entry verified (__xfrm_policy_check sp->verified_cnt, its nested-tunnel rule); the datagram
        # inside is then checked against both templates. It must win the lookup over the general policy,
        # which shares its addresses: a lower priority value.
        policy[policy.index("dir") + 2:policy.index("dir") + 2] = ["priority", "100"]
        src, dst = selector(transport)
        commands.append(["xfrm", "policy", "add", "src", _prefix(src), "dst", _prefix(dst), "proto", "udp",
                         "sport", str(transport.encap.sport), "dport", str(transport.encap.dport), "dir", "in",
                         "priority", "10", *_tmpl(tunnel, reqid + 1, Mode.TUNNEL)])
    return commands


SaOrBundle = SaParams | tuple[SaParams, SaParams]


def peer_commands(sas: list[SaOrBundle], first_reqid: int = 1) -> list[list[str]]:
    """States and policies mirroring all of the card's SAs (one reqid per SA); an (ESP, AH) tuple is a bundle."""
    out: list[list[str]] = []
    reqid = first_reqid
    for item in sas:
        if isinstance(item, tuple):
            out += bundle_commands(item[0], item[1], reqid)
            reqid += 2
        else:
            out.append(state_add(item, reqid))
            out.append(policy_add(item, reqid))
            reqid += 1
    return out


FLUSH_COMMANDS: list[list[str]] = [["xfrm", "policy", "flush"], ["xfrm", "state", "flush"]]


def batch_text(commands: list[list[str]]) -> str:
    """Input for `ip -batch -`: one command per line."""
    lines = []
    for argv in commands:
        for word in argv:
            if not word or any(c.isspace() for c in word):
                raise PeerConfigError(f"batch word {word!r} is empty or has whitespace")
        lines.append(" ".join(argv))
    return "\n".join(lines) + "\n"


# --- the peer's network namespace -----------------------------------------------------------------


@dataclass(frozen=True)
class PeerNet:
    """Addresses of the two ends. The card's side has no kernel netdev: guest_tools builds its frames."""

    netns: str = DEFAULT_NETNS
    peer_v4: str = "10.0.0.2"
    card_v4: str = "10.0.0.1"
    peer_v6: str = "fd00::2"
    card_v6: str = "fd00::1"
    # Tunnel mode: the networks behind each end (the peer's inner address lives on its loopback).
    peer_inner_v4: str = "192.168.2.1"
    card_inner_v4: str = "192.168.1.1"
    peer_inner_v6: str = "fd02::1"
    card_inner_v6: str = "fd01::1"

    def addrs(self, family: int, tunnel: bool = False) -> tuple[str, str]:
        """(card, peer) traffic addresses for a family; the inner ones in tunnel mode."""
        if family == 4:
            return (self.card_inner_v4, self.peer_inner_v4) if tunnel else (self.card_v4, self.peer_v4)
        return (self.card_inner_v6, self.peer_inner_v6) if tunnel else (self.card_v6, self.peer_v6)


def netns_setup(iface: str, card_mac: str, net: PeerNet = PeerNet()) -> tuple[list[list[str]], list[list[str]]]:
    """Commands that put ``iface`` into the peer netns with its addresses, routes and static neighbours
    for the card. Returns (root-namespace argv lists, batch commands to run inside the netns).

    IPv6 addresses skip DAD (nodad), else they stay tentative for a second and the first packets fail;
    the neighbour entries are permanent, so no ARP/ND is needed towards the user-space card."""
    root = [["netns", "add", net.netns], ["link", "set", iface, "netns", net.netns]]
    inside = [
        ["link", "set", "lo", "up"],
        ["link", "set", iface, "up"],
        ["addr", "add", f"{net.peer_v4}/24", "dev", iface],
        ["addr", "add", f"{net.peer_v6}/64", "dev", iface, "nodad"],
        ["addr", "add", f"{net.peer_inner_v4}/32", "dev", "lo"],
        ["addr", "add", f"{net.peer_inner_v6}/128", "dev", "lo", "nodad"],
        ["route", "add", f"{net.card_inner_v4}/32", "via", net.card_v4, "dev", iface],
        ["route", "add", f"{net.card_inner_v6}/128", "via", net.card_v6, "dev", iface],
        ["neigh", "replace", net.card_v4, "lladdr", card_mac, "dev", iface, "nud", "permanent"],
        ["neigh", "replace", net.card_v6, "lladdr", card_mac, "dev", iface, "nud", "permanent"],
    ]
    return root, inside


# --- reading the peer's counters (no keys leave these functions) -----------------------------------


def parse_xfrm_stat(text: str) -> dict[str, int]:
    """/proc/net/xfrm_stat: 'XfrmInError   0' lines -> {name: value} (Documentation/networking/xfrm_proc.rst)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def xfrm_errors(stats: dict[str, int]) -> dict[str, int]:
    """The non-zero error counters of /proc/net/xfrm_stat (every counter there counts a failure)."""
    return {k: v for k, v in stats.items() if v}


@dataclass
class PeerStateStats:
    """Counters of one XFRM state from `ip -s xfrm state` (iproute2 ip/ipxfrm.c xfrm_xfrma_print &co)."""

    src: str
    dst: str
    spi: int
    packets: int = 0
    bytes: int = 0
    replay_window_errors: int = 0  # 'stats: replay-window N' (outside the window)
    replay: int = 0  # 'replay N' (seen twice)
    integrity_failed: int = 0  # 'failed N' (ICV check failed)
    seq_hi: int | None = None  # ESN context: receive side high half
    seq: int | None = None
    oseq_hi: int | None = None
    oseq: int | None = None

    def as_dict(self) -> dict[str, object]:
        return dict(vars(self))


_SECTIONS = ("lifetime config:", "lifetime current:", "stats:", "anti-replay esn context:")
_STATE_HEAD = re.compile(r"^src (\S+) dst (\S+)$")
_SPI = re.compile(r"\bspi (0x[0-9a-fA-F]+)")
_CURRENT = re.compile(r"^(\d+)\(bytes\), (\d+)\(packets\)$")
_STATS = re.compile(r"^replay-window (\d+) replay (\d+) failed (\d+)$")
_ESN = re.compile(r"seq-hi (0x[0-9a-fA-F]+), seq (0x[0-9a-fA-F]+), oseq-hi (0x[0-9a-fA-F]+), oseq (0x[0-9a-fA-F]+)")
_NON_ESN = re.compile(r"^anti-replay context: seq (0x[0-9a-fA-F]+), oseq (0x[0-9a-fA-F]+)")


def parse_state_stats(text: str) -> list[PeerStateStats]:
    """Parse `ip -s xfrm state` output into per-state counters (algorithm and key lines are ignored)."""
    states: list[PeerStateStats] = []
    cur: PeerStateStats | None = None
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        head = _STATE_HEAD.match(raw.rstrip()) if raw and not raw[0].isspace() else None
        if head:
            cur = PeerStateStats(head.group(1), head.group(2), 0)
            states.append(cur)
            section = ""
            continue
        if cur is None or not line:
            continue
        if line in _SECTIONS:
            section = line[:-1]
            continue
        m = _SPI.search(line)
        if m and line.startswith("proto "):
            cur.spi = int(m.group(1), 16)
            continue
        m = _CURRENT.match(line)
        if m and section == "lifetime current":
            cur.bytes, cur.packets = int(m.group(1)), int(m.group(2))
            continue
        m = _STATS.match(line)
        if m and section == "stats":
            cur.replay_window_errors, cur.replay, cur.integrity_failed = (int(g) for g in m.groups())
            continue
        m = _ESN.search(line)
        if m:
            cur.seq_hi, cur.seq, cur.oseq_hi, cur.oseq = (int(g, 16) for g in m.groups())
            continue
        m = _NON_ESN.match(line)
        if m:
            cur.seq, cur.oseq = int(m.group(1), 16), int(m.group(2), 16)
    return states
