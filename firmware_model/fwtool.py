"""`ipsec-nic fw encap|decap`: run pcap files through the firmware model (packet offload) offline.

    ipsec-nic fw encap --sa sas.yaml --in plain.pcap --out esp.pcap
    ipsec-nic fw decap --sa sas.yaml --in esp.pcap --out plain.pcap

encap uses the file's outbound SAs: a packet is protected by the first SA whose selector matches it
(transport mode: the SA's src/dst; tunnel mode: its inner src/dst). decap uses the inbound SAs; a file
with no inbound SAs is used the way the receiving peer would (each outbound SA mirrored to inbound), so
the same file can encrypt and decrypt. Packets that match no SA or fail their check are left out of
the output and counted in the summary.

Classic pcap only (magic a1b2c3d4 / a1b23c4d, either byte order), LINKTYPE_ETHERNET (1) or LINKTYPE_RAW (101).
"""

from __future__ import annotations

import argparse
import struct
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from device.contract.enums import AuthAlg, Direction
from device.contract.sa import MAX_REPLAY_WINDOW, SaParams
from device.contract.sa_file import SaFileError, load_sa_file
from device.contract.status import CryptoStatus
from firmware_model.algorithms import AUTH_INFO, ENC_INFO
from firmware_model.capabilities import MAX_SA_CAPACITY, Capabilities, UdpEspEncapsulation
from firmware_model.esp import Verdict
from firmware_model.firmware import Firmware, TxOutcome
from firmware_model.sadb import SaRejected

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
MAX_RECORD = 256 * 1024  # larger than any jumbo frame; a bigger length means a corrupt file
_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1_000),  # microsecond, little-endian
    b"\xa1\xb2\xc3\xd4": (">", 1_000),
    b"\x4d\x3c\xb2\xa1": ("<", 1),  # nanosecond
    b"\xa1\xb2\x3c\x4d": (">", 1),
}
_FAKE_ETH = bytes(6) + b"\x02\x00\x00\x00\x00\x01"  # dst, src (locally administered)


class PcapError(ValueError):
    """Malformed or unsupported pcap file (one line)."""


@dataclass(frozen=True)
class PcapRecord:
    ts_sec: int
    ts_frac: int  # in the file's own unit (µs or ns)
    data: bytes
    orig_len: int


@dataclass(frozen=True)
class PcapHeader:
    endian: str
    nano: bool
    snaplen: int
    linktype: int


def read_pcap(path: str | Path) -> tuple[PcapHeader, list[PcapRecord]]:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise PcapError(f"{path}: cannot read: {exc.strerror or exc}") from None
    header, records = parse_pcap(raw, str(path))
    return header, list(records)


def parse_pcap(raw: bytes, name: str = "pcap") -> tuple[PcapHeader, Iterator[PcapRecord]]:
    if len(raw) < 24:
        raise PcapError(f"{name}: too short for a pcap header ({len(raw)} bytes)")
    magic = raw[:4]
    if magic not in _MAGICS:
        if magic == b"\x0a\x0d\x0d\x0a":
            raise PcapError(f"{name}: pcapng is not supported; convert with 'editcap -F pcap'")
        raise PcapError(f"{name}: not a pcap file (magic {magic.hex()})")
    endian, unit = _MAGICS[magic]
    major, _minor, _zone, _sig, snaplen, linktype = struct.unpack_from(endian + "HHiIII", raw, 4)
    if major != 2:
        raise PcapError(f"{name}: unsupported pcap version {major}")
    linktype &= 0x0FFF_FFFF  # upper bits carry FCS info in newer writers
    if linktype not in (LINKTYPE_ETHERNET, LINKTYPE_RAW):
        raise PcapError(f"{name}: link type {linktype} not supported (only Ethernet 1 and raw IP 101)")
    header = PcapHeader(endian, unit == 1, snaplen, linktype)
    rec = struct.Struct(endian + "IIII")

    def records() -> Iterator[PcapRecord]:
        off, index = 24, 0
        while off < len(raw):
            if off + 16 > len(raw):
                raise PcapError(f"{name}: record {index} header truncated at byte {off}")
            ts_sec, ts_frac, incl, orig = rec.unpack_from(raw, off)
            if incl > MAX_RECORD:
                raise PcapError(f"{name}: record {index} claims {incl} bytes (corrupt file?)")
            if off + 16 + incl > len(raw):
                raise PcapError(f"{name}: record {index} truncated ({incl} bytes announced)")
            yield PcapRecord(ts_sec, ts_frac, raw[off + 16 : off + 16 + incl], orig)
            off += 16 + incl
            index += 1

    return header, records()


def write_pcap(path: str | Path, header: PcapHeader, records: list[PcapRecord]) -> None:
    e = header.endian
    magic = 0xA1B23C4D if header.nano else 0xA1B2C3D4
    out = bytearray(struct.pack(e + "IHHiIII", magic, 2, 4, 0, 0, max(header.snaplen, MAX_RECORD), header.linktype))
    for r in records:
        out += struct.pack(e + "IIII", r.ts_sec, r.ts_frac, len(r.data), len(r.data))
        out += r.data
    Path(path).write_bytes(bytes(out))


def _tool_caps(count: int) -> Capabilities:
    """Everything the engine can honestly run, so the tool refuses only what the engine refuses."""
    return Capabilities(
        sa_capacity=max(1, min(count, MAX_SA_CAPACITY)),
        encryption=frozenset(a for a, i in ENC_INFO.items() if not i.unavailable),
        integrity=frozenset(a for a, i in AUTH_INFO.items() if not i.unavailable and a != AuthAlg.NONE),
        udp_esp=UdpEspEncapsulation.TRANSPORT | UdpEspEncapsulation.TUNNEL,
        max_replay_window=MAX_REPLAY_WINDOW,
    )


def _to_frame(data: bytes, linktype: int) -> bytes | None:
    if linktype == LINKTYPE_ETHERNET:
        return data
    if not data:
        return None
    etype = b"\x86\xdd" if data[0] >> 4 == 6 else b"\x08\x00"
    return _FAKE_ETH + etype + data


def _from_frame(frame: bytes, linktype: int) -> bytes:
    return frame if linktype == LINKTYPE_ETHERNET else frame[14:]


def build_firmware(sas: list[SaParams], direction: Direction) -> Firmware:
    chosen = [p for p in sas if p.direction == direction]
    if not chosen and direction == Direction.INBOUND:
        chosen = [replace(p, direction=Direction.INBOUND) for p in sas]
    if not chosen:
        raise SaFileError(f"no {direction.name.lower()} SA in the file")
    fw = Firmware(_tool_caps(len(chosen)))
    for i, p in enumerate(chosen):
        try:
            fw.add_sa([p], packet_offload=True)
        except SaRejected as exc:
            raise SaFileError(f"SA {i} (SPI {p.spi:#x}): {exc}") from None
    return fw


def run(action: str, sa_path: str, in_path: str, out_path: str, out=None) -> int:
    sas = load_sa_file(sa_path)
    header, records = read_pcap(in_path)
    fw = build_firmware(sas, Direction.OUTBOUND if action == "encap" else Direction.INBOUND)
    counts: Counter[str] = Counter()
    written: list[PcapRecord] = []
    for rec in records:
        frame = _to_frame(rec.data, header.linktype)
        if frame is None:
            counts["empty"] += 1
            continue
        if action == "encap":
            res = fw.transmit(frame, 0, packet_offload=True)
            counts[TxOutcome(res.status).name.lower()] += 1
            if res.status == TxOutcome.OK and res.frame is not None:
                written.append(replace(rec, data=_from_frame(res.frame, header.linktype)))
        else:
            rx = fw.receive(frame)
            if not rx.crypto_done:
                counts["no_sa" if rx.handle == 0 else "not_esp"] += 1
                continue
            name = Verdict(rx.verdict).name.lower() if rx.verdict >= 0 else CryptoStatus(rx.crypto_status).name
            counts[name] += 1
            if rx.crypto_status == CryptoStatus.SUCCESS and not rx.discard and rx.verdict == Verdict.OK:
                written.append(replace(rec, data=_from_frame(rx.frame, header.linktype)))
    write_pcap(out_path, header, written)
    detail = ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "nothing"
    print(f"fw {action}: {len(records)} packets in, {len(written)} out ({detail})", file=out or sys.stdout)
    return 0


def handle(args: argparse.Namespace) -> int:
    try:
        return run(args.fw_action, args.sa, args.input, args.output)
    except (SaFileError, PcapError) as exc:
        print(f"ipsec-nic fw {args.fw_action}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"ipsec-nic fw {args.fw_action}: {exc}", file=sys.stderr)
        return 1


def add_fw_subparser(subparsers) -> argparse.ArgumentParser:
    """Register `fw` (encap/decap) on an argparse subparsers object; the handler is args.func(args)."""
    fw = subparsers.add_parser("fw", help="run pcaps through the firmware model (ESP packet offload)",
                               description=__doc__.split("\n\n")[0])
    actions = fw.add_subparsers(dest="fw_action", required=True, metavar="{encap,decap}")
    for action, text in (("encap", "protect plain packets with the outbound SAs"),
                         ("decap", "check and strip ESP with the inbound SAs")):
        p = actions.add_parser(action, help=text, description=text)
        p.add_argument("--sa", required=True, help="SA file (YAML, see device/contract/sa_file.py)")
        p.add_argument("--in", dest="input", required=True, help="input pcap")
        p.add_argument("--out", dest="output", required=True, help="output pcap")
        p.set_defaults(func=handle)
    return fw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ipsec-nic")
    add_fw_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
