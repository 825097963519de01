"""Guest command line for the ipsec-nic card: a thin argparse layer over guest_tools.driver.

    PYTHONPATH=/opt/ipsec-nic python3 -m guest_tools.cli [--bdf BDF] [--irq poll|msix|auto] COMMAND ...

Commands: caps, sa add|del|update|list|stats, send, recv, stats, reset, probe, session, agent.

State model: each invocation is its own process. In sysfs mode the card keeps its SAs and stays enabled
between processes. In vfio mode the kernel resets the function on every open and release, which clears
the SAs, so the command line goes to a long-lived guest agent that holds the device (guest_tools/agent.py,
started on first use; ``agent stop`` releases the card). In sysfs mode every process re-programs the admin queue and the rings in its own memory and disables them
on exit (see guest_tools/driver.py). What the host must remember about crypto-offload SAs (sequence
counters, framing sizes; never keys) lives in /run/ipsec-nic/<bdf>.json ($IPSEC_NIC_STATE_DIR).
``session`` keeps one driver open and reads commands (one per line, same syntax, '#' comments) from
stdin or a file: frames sent and received in one session share the rings.

Exit status: 0 ok, 1 card or firmware error (message on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import TextIO

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class UsageError(ValueError):
    """Bad command-line input (exit status 2)."""


# ---------------------------------------------------------------------------------------------
# argument parsing (pure)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # raise instead of exiting, so `session` survives a typo
        raise UsageError(f"{self.prog}: {message}")


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ipsec-nic-guest", description="Drive the ipsec-nic card from the guest.")
    p.add_argument("--bdf", help="PCI address of the card when several exist (e.g. 0000:00:03.0)")
    p.add_argument("--irq", choices=("auto", "poll", "msix"), default="auto",
                   help="interrupts: msix needs vfio-pci + IOMMU; auto uses MSI-X when bound to vfio-pci")
    p.add_argument("--state", help="host SA state file (default /run/ipsec-nic/<bdf>.json)")
    p.add_argument("--no-agent", action="store_true",
                   help="vfio mode: open the device in this process instead of going through the guest agent "
                        "(the kernel's reset on open and close then clears the SAs of earlier processes)")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    sub.add_parser("caps", help="identity, registers and firmware capabilities")
    sub.add_parser("stats", help="card statistics registers and firmware counters")
    sub.add_parser("reset", help="CTRL.RESET: clears every SA and ring")
    sub.add_parser("probe", help="read-only probe of the card (guest_tools.probe)")
    ses = sub.add_parser("session", help="run commands from stdin or a file with one driver instance")
    ses.add_argument("script", nargs="?", help="file with one command per line (default stdin)")
    agt = sub.add_parser("agent", help="vfio mode: the guest agent that holds the card between CLI processes")
    agt.add_argument("action", choices=("status", "stop", "serve"),
                     help="status: is one running; stop: release the card (the kernel's reset clears every SA); "
                          "serve: be the agent (started automatically)")

    sa = sub.add_parser("sa", help="security associations").add_subparsers(dest="sa_cmd", required=True,
                                                                          parser_class=_Parser)
    add = sa.add_parser("add", help="offload an SA (from --sa FILE or from flags)")
    add.add_argument("--sa", metavar="FILE", help="SA YAML file (the format 'ipsec-nic fw' reads)")
    add.add_argument("--index", type=_int, help="only this entry of the file (default: all)")
    add.add_argument("--spi", type=_int)
    add.add_argument("--dir", choices=("in", "out", "inbound", "outbound"))
    add.add_argument("--mode", choices=("transport", "tunnel"), default="transport")
    add.add_argument("--proto", choices=("esp", "ah"), default="esp")
    add.add_argument("--src", help="SA source (tunnel: outer endpoint)")
    add.add_argument("--dst", help="SA destination (tunnel: outer endpoint)")
    add.add_argument("--inner-src", help="tunnel: inner selector source")
    add.add_argument("--inner-dst", help="tunnel: inner selector destination")
    add.add_argument("--sel-proto", metavar="tcp|udp|N", help="selector protocol (the SA file's selector.proto): "
                     "an inbound v1 or packet-offload SA delivers only this protocol")
    add.add_argument("--sel-sport", type=_int, metavar="PORT", help="selector source port (needs --sel-proto "
                     "tcp or udp)")
    add.add_argument("--sel-dport", type=_int, metavar="PORT", help="selector destination port (needs "
                     "--sel-proto tcp or udp)")
    add.add_argument("--aead", metavar="ALG:KEY:SALT[:ICV]", help="e.g. aes-gcm-128:<hex>:<hex>:16, "
                     "aes-gmac-128:<hex>:<hex> (keys on the command line are visible in ps and shell "
                     "history: prefer --key-file or --sa)")
    add.add_argument("--cipher", metavar="ALG:KEY", help="e.g. aes-cbc-128:<hex>")
    add.add_argument("--integrity", metavar="ALG:KEY", help="e.g. hmac-sha256-128:<hex>")
    add.add_argument("--key-file", metavar="FILE",
                     help="read the algorithms and keys from FILE ('-' = stdin) instead of the command line: "
                          "lines 'aead ALG:KEY:SALT[:ICV]', 'cipher ALG:KEY', 'integrity ALG:KEY'; '#' comments")
    add.add_argument("--ah-spi", type=_int, help="ESP-then-AH bundle: SPI of the AH SA (with --ah-integrity)")
    add.add_argument("--ah-integrity", metavar="ALG:KEY", help="ESP-then-AH bundle: the AH SA's integrity "
                     "algorithm and key, e.g. hmac-sha256-128:<hex>")
    add.add_argument("--esn", action="store_true", help="extended sequence numbers (RFC 4304)")
    add.add_argument("--seq", type=_int, help="outbound: last sequence number used (the first packet carries "
                     "SEQ+1, like iproute2's replay-oseq); inbound: top of the window (packet offload; crypto "
                     "offload takes only an ESN high half)")
    add.add_argument("--replay-window", type=_int, help="inbound anti-replay window (packet offload; default 64)")
    add.add_argument("--lifetime", metavar="KEY=N[,KEY=N...]",
                     help="packet offload: " + ", ".join(LIFETIME_KEYS) + " (0 = no limit); the card raises "
                     "SaDeleteReq at the soft limit and refuses traffic past the hard one")
    add.add_argument("--encap", metavar="udp:SPORT:DPORT", help="UDP encapsulation (RFC 3948)")
    add.add_argument("--offload", choices=("crypto", "packet"), default="crypto")
    add.add_argument("--v1", action="store_true", help="use the v1 commands (ADD_SA / ADD_UDPESP_SA)")
    add.epilog = "Fields per offload mode (card / host driver / refused):\n" + _fields_help()
    add.formatter_class = argparse.RawDescriptionHelpFormatter
    dele = sa.add_parser("del", help="delete SAs")
    dele.add_argument("handles", nargs="*", type=_int)
    dele.add_argument("--all", action="store_true")
    upd = sa.add_parser("update", help="push the ESN high half of an SA (V2_UPDATE_SA)")
    upd.add_argument("handle", type=_int)
    upd.add_argument("--seq-hi", type=_int, required=True)
    sa.add_parser("list", help="SAs on the card (no keys)")
    sst = sa.add_parser("stats", help="per-SA counters")
    sst.add_argument("handle", type=_int)

    snd = sub.add_parser("send", help="send UDP test frames")
    snd.add_argument("--count", type=_int, default=1, help="frames to send (default 1)")
    snd.add_argument("--size", type=_int, default=64, help="UDP payload bytes")
    snd.add_argument("--rate", type=float, default=0.0, help="frames per second (0 = as fast as possible)")
    snd.add_argument("--src", required=True, help="IPv4/IPv6 source address of the inner packet")
    snd.add_argument("--dst", required=True, help="IPv4/IPv6 destination address of the inner packet")
    snd.add_argument("--proto", choices=("udp",), default="udp", help="payload protocol (udp)")
    snd.add_argument("--sport", type=_int, default=4000, help="UDP source port (default 4000)")
    snd.add_argument("--dport", type=_int, default=5000, help="UDP destination port (default 5000)")
    snd.add_argument("--dst-mac", default="ff:ff:ff:ff:ff:ff", help="destination MAC (default broadcast)")
    g = snd.add_mutually_exclusive_group()
    g.add_argument("--sa", type=_int, metavar="HANDLE", help="outbound SA handle")
    g.add_argument("--plain", action="store_true", help="no IPsec")
    snd.add_argument("--mode", choices=("crypto", "packet"), help="offload kind (default crypto with --sa)")
    snd.add_argument("--tunnel-sa", type=_int, metavar="HANDLE",
                     help="transport over tunnel (crypto offload): --sa is the transport SA, this the tunnel SA "
                          "(needs FEATURES.TRANSPORT_TUNNEL_COMBINED; a UDP-encapsulated layer also needs its "
                          "UDP_ESP kind)")

    rcv = sub.add_parser("recv", help="print received frames (frames that arrived since the last receiver "
                                       "wait in the card's RX backlog, up to 64)")
    rcv.add_argument("--count", type=_int, default=1, help="frames to wait for (default 1)")
    rcv.add_argument("--timeout", type=float, default=5.0, help="seconds to wait in all (default 5)")
    rcv.add_argument("--json", action="store_true", help="one JSON object per frame, with the frame bytes")
    return p


LIFETIME_KEYS = ("soft_packets", "hard_packets", "soft_bytes", "hard_bytes")


def _fields_help() -> str:
    from device.contract.sa_fields import FIELD_RULES

    return "\n".join(f"  {r.key:<14} {r.case:<34} crypto {r.crypto.value:<7} v1 {r.crypto_v1.value:<7} "
                     f"packet {r.packet.value}" for r in FIELD_RULES)


def parse_lifetime(text: str) -> dict[str, int]:
    """``--lifetime soft_packets=N,hard_bytes=M`` -> SaParams lifetime fields."""
    out: dict[str, int] = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or key not in LIFETIME_KEYS:
            raise UsageError(f"--lifetime: expected KEY=N with KEY one of {', '.join(LIFETIME_KEYS)}, got {item!r}")
        if key in out:
            raise UsageError(f"--lifetime: {key} given twice")
        try:
            out[key] = int(value, 0)
        except ValueError:
            raise UsageError(f"--lifetime: {key}: not a number: {value!r}") from None
        if out[key] < 0:
            raise UsageError(f"--lifetime: {key} must not be negative")
    return out


def given_from_args(a: argparse.Namespace, params) -> frozenset[str]:
    """The SA-file keys `sa add` flags set to something (defaults are not "given")."""
    given = {"proto", "mode", "src", "dst"}
    if a.esn:
        given.add("esn")
    if a.seq is not None:
        given.add("seq")
    if params.replay_window and a.replay_window is not None:
        given.add("replay_window")
    if any((params.soft_packets, params.hard_packets, params.soft_bytes, params.hard_bytes)):
        given.add("lifetime")
    if a.encap:
        given.add("encap")
    if a.ah_spi is not None:
        given.add("ah")
    if params.sel_proto or params.sel_sport or params.sel_dport:
        given.add("selector")
    return frozenset(given)


def _flag_of(key: str, a: argparse.Namespace) -> str:
    """The flag(s) that set SA-file key ``key``: the file's ``selector`` is three flags."""
    if key == "selector":
        return "/".join(f"--sel-{n}" for n in ("proto", "sport", "dport") if getattr(a, f"sel_{n}", None))
    return "--" + key.replace("_", "-")


def check_flags_honoured(a: argparse.Namespace, params) -> None:
    """UsageError naming the flag when `sa add` flags ask for something the offload mode cannot do."""
    from device.contract.sa_fields import Offload, refusals

    for r in refusals(params, given_from_args(a, params), Offload.of(a.offload, a.v1)):
        raise UsageError(f"SA {params.spi:#x}: {_flag_of(r.key, a)}: {r.message}")


def selector_from_args(a: argparse.Namespace) -> dict[str, int]:
    """--sel-proto/--sel-sport/--sel-dport -> SaParams sel_* (the SA file's selector rules)."""
    from device.contract.sa_file import SaFileError, selector_proto

    out = {"sel_proto": 0, "sel_sport": 0, "sel_dport": 0}
    try:
        if getattr(a, "sel_proto", None) is not None:
            out["sel_proto"] = selector_proto(a.sel_proto, "--sel-proto")
    except SaFileError as exc:
        raise UsageError(str(exc)) from None
    for name in ("sport", "dport"):
        port = getattr(a, f"sel_{name}", None)
        if port is not None:
            if not 0 <= port <= 0xFFFF:
                raise UsageError(f"--sel-{name}: {port} is not a port")
            out[f"sel_{name}"] = port
    if (out["sel_sport"] or out["sel_dport"]) and out["sel_proto"] not in (6, 17):
        raise UsageError("--sel-sport/--sel-dport need --sel-proto tcp or udp")
    return out


def parse_aead(text: str) -> tuple[str, bytes, bytes, int]:
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise UsageError("--aead wants ALG:KEY:SALT[:ICV]")
    icv = int(parts[3], 0) if len(parts) == 4 else 16
    return parts[0], _hex(parts[1], "--aead key"), _hex(parts[2], "--aead salt"), icv


def _hex(text: str, what: str) -> bytes:
    try:
        return bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        raise UsageError(f"{what}: not hex") from None  # never echo key material


def _alg_key(text: str, what: str) -> tuple[str, bytes]:
    alg, sep, key = text.partition(":")
    if not sep:
        raise UsageError(f"{what} wants ALG:KEY")
    return alg, _hex(key, f"{what} key")


KEY_FILE_FIELDS = ("aead", "cipher", "integrity")


def read_key_file(path: str, stdin: TextIO | None = None) -> dict[str, str]:
    """The ``--key-file`` specs by field; UsageError naming the file and line (never the key)."""
    where = "<stdin>" if path == "-" else path
    try:
        if path == "-":
            text = (stdin or sys.stdin).read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except OSError as exc:
        raise UsageError(f"--key-file {where}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--key-file {where}: not UTF-8 text") from None
    specs: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2 or words[0] not in KEY_FILE_FIELDS:
            raise UsageError(f"--key-file {where}:{lineno}: expected '{'|'.join(KEY_FILE_FIELDS)} SPEC'")
        if words[0] in specs:
            raise UsageError(f"--key-file {where}:{lineno}: {words[0]} given twice")
        specs[words[0]] = words[1]
    if not specs:
        raise UsageError(f"--key-file {where}: no aead, cipher or integrity line")
    return specs


def keys_on_argv(a: argparse.Namespace) -> bool:
    """True when `sa add` got key material in --aead/--cipher/--integrity."""
    return getattr(a, "cmd", None) == "sa" and getattr(a, "sa_cmd", None) == "add" and any(
        getattr(a, name, None) for name in KEY_FILE_FIELDS)


def params_from_args(a: argparse.Namespace):
    """SaParams from `sa add` flags; UsageError with a one-line reason."""
    from device.contract.algorithms import AUTH_BY_NAME, ENC_BY_NAME
    from device.contract.enums import AuthAlg, Direction, EncAlg, IpProto, Mode
    from device.contract.sa import SaInvalid, SaParams, UdpEncap, validate_sa

    missing = [n for n in ("spi", "dir", "src", "dst") if getattr(a, n) is None]
    if missing:
        raise UsageError("sa add needs --sa FILE, or " + ", ".join(f"--{m}" for m in missing))
    if getattr(a, "key_file", None):
        if any(getattr(a, n) for n in KEY_FILE_FIELDS):
            raise UsageError("give the keys in --key-file or as --aead/--cipher/--integrity, not both")
        for name, spec in read_key_file(a.key_file).items():
            setattr(a, name, spec)
    enc_alg, enc_key, auth_alg, auth_key, icv = EncAlg.NONE, b"", AuthAlg.NONE, b"", 16
    if a.aead and (a.cipher or a.integrity):
        raise UsageError("give --aead, or --cipher/--integrity, not both")
    if a.aead:
        name, key, salt, icv = parse_aead(a.aead)
        if name in ENC_BY_NAME:
            enc_alg, enc_key = ENC_BY_NAME[name], key + salt
        elif name in AUTH_BY_NAME:
            auth_alg, auth_key = AUTH_BY_NAME[name], key + salt
        else:
            raise UsageError(f"unknown AEAD {name!r}")
    if a.cipher:
        name, enc_key = _alg_key(a.cipher, "--cipher")
        if name not in ENC_BY_NAME:
            raise UsageError(f"unknown cipher {name!r} (one of {', '.join(ENC_BY_NAME)})")
        enc_alg = ENC_BY_NAME[name]
    if a.integrity:
        name, auth_key = _alg_key(a.integrity, "--integrity")
        if name not in AUTH_BY_NAME:
            raise UsageError(f"unknown integrity algorithm {name!r} (one of {', '.join(AUTH_BY_NAME)})")
        auth_alg = AUTH_BY_NAME[name]
        if not a.aead:
            from device.contract.algorithms import AUTH_INFO

            icv = AUTH_INFO[auth_alg].icv_len
    encap = None
    if a.encap:
        kind, _, ports = a.encap.partition(":")
        sport, _, dport = ports.partition(":")
        if kind != "udp":
            raise UsageError("--encap wants udp[:SPORT:DPORT]")
        try:
            encap = UdpEncap(int(sport or 4500), int(dport or 4500))
        except ValueError:
            raise UsageError("--encap ports must be numbers") from None
    params = SaParams(
        spi=a.spi, proto=IpProto.ESP if a.proto == "esp" else IpProto.AH,
        direction=Direction.INBOUND if a.dir.startswith("in") else Direction.OUTBOUND,
        mode=Mode.TUNNEL if a.mode == "tunnel" else Mode.TRANSPORT, src=a.src, dst=a.dst,
        enc_alg=enc_alg, enc_key=enc_key, auth_alg=auth_alg, auth_key=auth_key, icv_len=icv, esn=a.esn,
        seq=a.seq or 0, replay_window=64 if a.replay_window is None else a.replay_window, encap=encap,
        inner_src=a.inner_src, inner_dst=a.inner_dst, **(parse_lifetime(a.lifetime) if a.lifetime else {}),
        **selector_from_args(a),
    )
    try:
        validate_sa(params)
    except SaInvalid as exc:
        raise UsageError(f"SA {a.spi:#x}: {exc}") from None
    return params


def ah_from_args(a: argparse.Namespace, esp):
    """The AH SA of an ESP-then-AH bundle from --ah-spi/--ah-integrity (None without them)."""
    from dataclasses import replace

    from device.contract.algorithms import AUTH_BY_NAME, AUTH_INFO
    from device.contract.enums import EncAlg, IpProto
    from device.contract.sa import SaInvalid, validate_sa

    if (a.ah_spi is None) != (a.ah_integrity is None):
        raise UsageError("an ESP-then-AH bundle needs both --ah-spi and --ah-integrity")
    if a.ah_spi is None:
        return None
    if esp.proto != IpProto.ESP:
        raise UsageError("--ah-spi bundles AH after an ESP SA (--proto esp)")
    name, key = _alg_key(a.ah_integrity, "--ah-integrity")
    if name not in AUTH_BY_NAME:
        raise UsageError(f"unknown integrity algorithm {name!r} (one of {', '.join(AUTH_BY_NAME)})")
    alg = AUTH_BY_NAME[name]
    ah = replace(esp, spi=a.ah_spi, proto=IpProto.AH, enc_alg=EncAlg.NONE, enc_key=b"", auth_alg=alg, auth_key=key,
                 icv_len=AUTH_INFO[alg].icv_len, encap=None)
    try:
        validate_sa(ah)
    except SaInvalid as exc:
        raise UsageError(f"AH SA {a.ah_spi:#x}: {exc}") from None
    return ah


def build_frames(card_mac: bytes, a: argparse.Namespace) -> list[bytes]:
    """The UDP test frames `send` transmits (payload carries a counter)."""
    from guest_tools import packets

    try:
        dst_mac = packets.parse_mac(a.dst_mac)
        frames = []
        for n in range(a.count):
            ip = packets.udp_packet(a.src, a.dst, a.sport, a.dport, packets.pattern_payload(a.size, n))
            frames.append(packets.ethernet(dst_mac, card_mac, ip))
    except (ValueError, packets.FrameError) as exc:
        raise UsageError(f"send: {exc}") from None
    return frames


# ---------------------------------------------------------------------------------------------
# commands


class Session:
    """Runs parsed commands; opens the card lazily and keeps it open until close()."""

    def __init__(self, opener: Callable[..., object] | None = None, out: TextIO | None = None) -> None:
        self.opener = opener
        self.out = out or sys.stdout
        self.card = None
        self.keep_receiving = False  # a session keeps one card handle for all its commands
        self.from_argv = True  # commands come from the process's argv (not a session script)

    def print(self, *items: object) -> None:
        print(*items, file=self.out)

    def open(self, a: argparse.Namespace, reset: bool = False):
        if reset and self.card is not None:
            self.card.init(reset=True)
            return self.card
        if self.card is None:
            if self.opener is not None:
                self.card = self.opener(a, reset)
            else:
                from guest_tools.driver import open_card

                # Only commands that take frames arm an RX ring; the others leave arriving frames in
                # the card's backlog for the next `recv` (or `session`).
                receive = a.cmd in ("recv", "session") or self.keep_receiving
                self.card = open_card(a.bdf, a.irq, reset=reset, state_path=a.state, receive=receive)
        return self.card

    def close(self) -> None:
        if self.card is not None:
            self.card.close()
            self.card = None

    def run(self, a: argparse.Namespace) -> int:
        handler = getattr(self, "cmd_" + a.cmd + (f"_{a.sa_cmd}" if a.cmd == "sa" else ""))
        return handler(a) or EXIT_OK

    # -- identity / stats
    def cmd_caps(self, a):
        from device.contract.regs import Features

        card = self.open(a)
        i = card.ident
        self.print(f"card {getattr(card, 'bdf', '-')}: regmap {i.regmap} hw {i.hw_version} fw {i.fw_version} "
                   f"mac {i.mac_text}")
        self.print(f"  queues tx {i.num_txq} rx {i.num_rxq}, ring max {i.max_ring}, msix {i.num_msix}, "
                   f"max mtu {i.max_mtu}, interrupts {card.irq.name}")
        self.print("  features: " + " ".join(n for n, m in Features.__members__.items() if i.features & m))
        caps = card.caps()
        for name, value in vars(caps).items():
            self.print(f"  {name}: {value:#x}" if name.endswith(("algorithms", "udp_esp", "flags"))
                       else f"  {name}: {value}")

    def cmd_stats(self, a):
        card = self.open(a)
        self.print("card registers:")
        for name, value in card.stats().items():
            self.print(f"  {name}: {value}")
        self.print("firmware:")
        for name, value in vars(card.firmware_stats()).items():
            if value or not name.startswith("reject_"):
                self.print(f"  {name}: {value}")
        if card.sa_delete_requests:
            self.print(f"SaDeleteReq interrupts seen: {card.sa_delete_requests}")
        if card.host_policy_drops:
            self.print(f"dropped by this host, inner header outside the SA's selector (RFC 4301 §5.2): "
                       f"{card.host_policy_drops}")

    def cmd_reset(self, a):
        card = self.open(a, reset=True)
        self.print(f"card reset; MAC {card.ident.mac_text}; all SAs cleared")

    def cmd_agent(self, a):
        if a.action != "serve":
            self.print("no guest agent: this card is not in vfio mode (sysfs mode keeps SAs between processes)")
            return EXIT_OK if a.action == "status" else EXIT_ERROR
        from guest_tools import agent
        from guest_tools.driver import card_uses_vfio

        if self.card is not None:
            raise UsageError("agent serve: this process already holds the card")
        bdf, _ = card_uses_vfio(a.bdf, a.irq)
        self.keep_receiving = True
        self.open(a)  # hold the card before answering: a client that sees the socket finds the device held
        served = agent.Agent(self, agent.socket_path(bdf), run_one)
        served.serve(served.listen())
        return EXIT_OK

    def cmd_probe(self, a):
        from guest_tools import probe

        return probe.main(["--bdf", a.bdf] if a.bdf else [])

    # -- SAs
    def cmd_sa_add(self, a):
        if self.from_argv and keys_on_argv(a):
            print("warning: key material on the command line is visible to other users (ps, /proc) and in "
                  "shell history; use --key-file FILE (or -) or --sa FILE", file=sys.stderr)
        if a.sa:
            from device.contract.sa_fields import Offload
            from device.contract.sa_file import load_sa_entries

            try:
                entries = load_sa_entries(a.sa, Offload.of(a.offload, a.v1))
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            if a.index is not None:
                if not 0 <= a.index < len(entries):
                    raise UsageError(f"--index {a.index}: {a.sa} has {len(entries)} SAs")
                entries = [entries[a.index]]
            all_params = [e.params for e in entries]
            ahs = [e.ah for e in entries]
            where = [f"{a.sa}: {e.where}" for e in entries]
        else:
            all_params = [params_from_args(a)]
            ahs = [ah_from_args(a, all_params[0])]
            check_flags_honoured(a, all_params[0])
            where = ["--spi"]
        card = self.open(a)
        if a.offload == "crypto" and not a.v1 and len(all_params) > 1:
            return self._add_list(card, all_params, ahs, where)
        for p, ah in zip(all_params, ahs, strict=True):
            handle = card.add_sa(p, offload=a.offload, v1=a.v1, **({"ah": ah} if ah is not None else {}))
            self.print(f"{handle:#010x} spi {p.spi:#x} {p.direction.name.lower()} {p.mode.name.lower()} "
                       f"{a.offload}" + _proto_text(p, ah))

    def _add_list(self, card, all_params, ahs, where) -> int:
        """Several crypto-offload SAs as one V2_ADD_SA list (NDIS v2): one line per entry, the refused ones
        with their NDIS status and what it means; exit 1 if any entry was refused."""
        from guest_tools.sa import status_message

        refused = 0
        for w, ah, r in zip(where, ahs, card.add_sa_list(all_params, ahs), strict=True):
            p = r.params
            if r.handle and r.status == 0:
                self.print(f"{r.handle:#010x} spi {p.spi:#x} {p.direction.name.lower()} {p.mode.name.lower()} "
                           "crypto" + _proto_text(p, ah))
            else:
                refused += 1
                self.print(f"refused    spi {p.spi:#x} {p.direction.name.lower()} {p.mode.name.lower()} crypto "
                           f"({w}): {status_message(r.status)}" + (f" [{r.reason_name}]" if r.reason_name else ""))
        if refused:
            print(f"error: {refused} of {len(all_params)} SA(s) refused by the card (the others were added)",
                  file=sys.stderr)
            return EXIT_ERROR
        return EXIT_OK

    def cmd_sa_del(self, a):
        if not a.handles and not a.all:
            raise UsageError("sa del needs HANDLE... or --all")
        card = self.open(a)
        if a.all:
            self.print(f"deleted {card.delete_all()} SA bundle(s)")
        else:
            card.delete_sa(a.handles)
            self.print(f"deleted {len(a.handles)} SA bundle(s)")

    def cmd_sa_update(self, a):
        self.open(a).update_sa(a.handle, a.seq_hi)
        self.print(f"{a.handle:#010x}: ESN high half {a.seq_hi:#x}")

    def cmd_sa_list(self, a):
        from device.contract.ndis import SaListFlags

        rows = self.open(a).list_sas()
        self.print(f"{len(rows)} SA(s)")
        for e in rows:
            flags = ",".join(n.lower() for n, m in SaListFlags.__members__.items() if e.flags & m) or "-"
            self.print(f"{e.offload_handle:#010x} spi {e.spi:#010x} {'esp' if e.proto == 50 else 'ah'} "
                       f"{'in' if e.direction == 1 else 'out'} {'tunnel' if e.mode else 'transport'} "
                       f"ipv{e.family} {flags}" + (f" paired {e.paired_handle:#010x}" if e.paired_handle else ""))

    def cmd_sa_stats(self, a):
        for e in self.open(a).sa_stats(a.handle):
            self.print(" ".join(f"{k}={v:#x}" if k == "spi" else f"{k}={v}" for k, v in vars(e).items()))

    # -- traffic
    def cmd_send(self, a):
        if a.sa is None and not a.plain and a.mode != "packet":
            raise UsageError("send needs --sa HANDLE, --plain, or --mode packet (selector lookup)")
        if a.plain and a.mode:
            raise UsageError("--plain takes no --mode")
        if a.tunnel_sa is not None and (a.sa is None or a.mode == "packet"):
            raise UsageError("--tunnel-sa needs --sa (the transport SA) and crypto offload")
        card = self.open(a)
        frames = build_frames(card.ident.mac, a)
        mode = "plain" if a.plain else (a.mode or "crypto")
        gap = 1.0 / a.rate if a.rate > 0 else 0.0
        start = time.monotonic()
        results: Counter[str] = Counter()
        for n, frame in enumerate(frames):
            if gap:
                delay = start + n * gap - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            # with --tunnel-sa the driver refuses the first frame (CardError, nothing queued) when the card
            # does not advertise FEATURES.TRANSPORT_TUNNEL_COMBINED
            card.send(frame, a.sa or 0, mode, tunnel_handle=a.tunnel_sa or 0)
            for c in card.poll_tx():
                results[c.status_name] += 1
        for c in card.flush_tx():
            results[c.status_name] += 1
        took = time.monotonic() - start
        summary = " ".join(f"{k}={v}" for k, v in sorted(results.items()))
        self.print(f"sent {len(frames)} frame(s) in {took:.3f} s ({len(frames) / took if took else 0:.0f}/s): "
                   f"{summary}")
        return EXIT_OK if results.get("OK", 0) == len(frames) else EXIT_ERROR

    def cmd_recv(self, a):
        card = self.open(a)
        got = 0
        deadline = time.monotonic() + a.timeout
        while got < a.count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for pkt in card.recv(timeout=left, limit=a.count - got):
                got += 1
                s = pkt.summary()
                if a.json:
                    s["frame"] = pkt.frame.hex()
                    if pkt.inner is not None:
                        s["inner"] = pkt.inner.hex()
                    self.print(json.dumps(s))
                else:
                    # transport over tunnel: handle = tunnel SA, next_handle = transport SA (datasheet §7.6)
                    nested = (f" next_crypto_done=1 next_handle={s['next_handle']:#x} "
                              f"tunnel_status={s['tunnel_status']} transport_status={s['transport_status']}"
                              if s["next_crypto_done"] else "")
                    self.print(f"len={s['length']} crypto_done={int(s['crypto_done'])} "
                               f"crypto_status={s['crypto_status']} sa_delete_req={int(s['sa_delete_req'])} "
                               f"handle={s['handle']:#x}" + nested
                               + (" policy_mismatch=1" if s["policy_mismatch"] else "")
                               + (" l4_csum_ok=1" if s["l4_csum_ok"] else "")
                               + (f" inner={s['inner_length']}" if pkt.inner else "")
                               + (f" ({s['note']})" if s["note"] else ""))
        if got < a.count:
            print(f"received {got} of {a.count} frame(s) within {a.timeout:g} s", file=sys.stderr)
            return EXIT_ERROR
        return EXIT_OK

    def cmd_session(self, a):
        self.keep_receiving = True
        self.from_argv = False  # script lines are not visible to other users
        stream = open(a.script) if a.script else sys.stdin  # noqa: SIM115 - closed below
        worst = EXIT_OK
        try:
            for lineno, line in enumerate(stream, 1):
                try:
                    words = shlex.split(line, comments=True)
                except ValueError as exc:  # "No closing quotation": report it, go on with the next line
                    print(f"usage error: {a.script or '<stdin>'}:{lineno}: {exc}", file=sys.stderr)
                    self.print(f"# line {lineno}: exit {EXIT_USAGE}")
                    worst = max(worst, EXIT_USAGE)
                    continue
                if not words:
                    continue
                if words[0] == "session":
                    self.print(f"line {lineno}: session cannot nest")
                    worst = max(worst, EXIT_USAGE)
                    continue
                status = run_one(self, [*_globals(a), *words])
                self.print(f"# line {lineno}: exit {status}")
                self.out.flush()
                worst = max(worst, status)
        finally:
            if stream is not sys.stdin:
                stream.close()
        return worst


def _proto_text(p, ah) -> str:
    """" ah" / " esp+ah spi 0x..." after an added SA's line (nothing for plain ESP, as before)."""
    from device.contract.enums import IpProto

    if ah is not None:
        return f" esp+ah ah-spi {ah.spi:#x}" + _selector_text(p)
    return (" ah" if p.proto == IpProto.AH else "") + _selector_text(p)


def _selector_text(p) -> str:
    """" selector udp sport any dport 5001" when the SA has one (nothing otherwise, as before)."""
    from device.contract.sa_file import SELECTOR_PROTOS

    if not (p.sel_proto or p.sel_sport or p.sel_dport):
        return ""
    names = {v: k for k, v in SELECTOR_PROTOS.items()}
    proto = names.get(p.sel_proto, str(p.sel_proto))
    return f" selector {proto} sport {p.sel_sport or 'any'} dport {p.sel_dport or 'any'}"


def _globals(a: argparse.Namespace) -> list[str]:
    out = []
    if a.bdf:
        out += ["--bdf", a.bdf]
    if a.state:
        out += ["--state", a.state]
    return out + ["--irq", a.irq]


def run_one(session: Session, argv: list[str]) -> int:
    """Parse and run one command; errors become a message and an exit status."""
    from guest_tools.driver import CardError

    try:
        args = build_parser().parse_args(argv)
        return session.run(args)
    except UsageError as exc:
        print(f"usage error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help inside a session
        return int(exc.code or 0)
    except CardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _agent_socket(args_list: list[str]):
    """The guest agent's socket when this command must go through it (vfio mode), else None.

    vfio-pci resets the function whenever a process opens or releases the device and the reset clears
    every SA, so in vfio mode one long-lived agent holds the device (guest_tools/agent.py)."""
    if "-h" in args_list or "--help" in args_list:
        return None, None
    try:
        a = build_parser().parse_args(args_list)
    except (UsageError, SystemExit):
        return None, None  # run_one reports it
    if a.no_agent or a.cmd == "probe":
        return None, a
    from guest_tools import agent, pci
    from guest_tools.driver import card_uses_vfio

    try:
        bdf, vfio = card_uses_vfio(a.bdf, a.irq)
    except (pci.PciError, OSError):
        return None, a  # run_one opens the card and reports what is wrong
    if not vfio:
        return None, a
    path = agent.socket_path(bdf)
    if a.cmd == "agent":
        return (path, a) if a.action != "serve" else (None, a)
    return agent.ensure_running(bdf, a.irq, a.state), a


def _forward(path, a: argparse.Namespace, args_list: list[str]) -> int:
    from guest_tools import agent

    if a.cmd == "agent":
        if not (path.exists() and agent.is_running(path)):
            print(f"no guest agent running for {path.stem}")
            return EXIT_OK if a.action == "status" else EXIT_ERROR
        answer = agent.request(path, control=a.action)
    else:
        stdin = None
        if (a.cmd == "session" and not a.script) or getattr(a, "key_file", None) == "-":
            stdin = sys.stdin.read()
        if keys_on_argv(a):
            print("warning: key material on the command line is visible to other users (ps, /proc) and in "
                  "shell history; use --key-file FILE (or -) or --sa FILE", file=sys.stderr)
        answer = agent.request(path, args_list, stdin=stdin)
    sys.stdout.write(answer["stdout"])
    sys.stderr.write(answer["stderr"])
    return int(answer["status"])


def main(argv: list[str] | None = None, opener=None) -> int:
    session = Session(opener)
    try:
        args_list = sys.argv[1:] if argv is None else argv
        if args_list and args_list[0] in ("-h", "--help"):
            build_parser().print_help()
            return EXIT_OK
        if opener is None:
            from guest_tools import agent

            try:
                path, a = _agent_socket(args_list)
                if path is not None:
                    return _forward(path, a, args_list)
            except (agent.AgentError, OSError, ValueError) as exc:
                print(f"error: guest agent: {exc}", file=sys.stderr)
                return EXIT_ERROR
        return run_one(session, args_list)
    finally:
        try:
            session.close()
        except Exception as exc:  # closing must not mask the command's own result
            print(f"warning: closing the card failed: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
