"""`ipsec-nic fw encap|decap`: run pcap files through the firmware model (packet offload) offline.

    ipsec-nic fw encap --sa sas.yaml --in plain.pcap --out esp.pcap
    ipsec-nic fw decap --sa sas.yaml --in esp.pcap --out plain.pcap

encap uses the file's outbound SAs: a packet is protected by the first SA whose selector matches it
(transport mode: the SA's src/dst; tunnel mode: its inner src/dst). decap uses the inbound SAs; a file
with no inbound SAs is used the way the receiving peer would (each outbound SA mirrored to inbound), so
the same file can encrypt and decrypt. Packets that match no SA or fail their check are left out of
the output and counted in the summary.

Reads classic pcap (µs or ns, either byte order) and pcapng, link types Ethernet (1), raw IP (101), IPv4 (228)
and IPv6 (229); writes the output in the input's format (see firmware_model/capture_file.py).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import replace

from device.contract.enums import AuthAlg, Direction
from device.contract.sa import MAX_REPLAY_WINDOW, SaParams
from device.contract.sa_file import SaFileError, load_sa_file
from device.contract.status import CryptoStatus
from firmware_model.algorithms import AUTH_INFO, ENC_INFO
from firmware_model.capabilities import MAX_SA_CAPACITY, Capabilities, UdpEspEncapsulation
from firmware_model.capture_file import (
    CaptureError,
    CaptureRecord,
    from_frame,
    read_capture,
    to_frame,
    write_capture,
)
from firmware_model.esp import Verdict
from firmware_model.firmware import Firmware, TxOutcome
from firmware_model.sadb import SaRejected


def _tool_caps(count: int) -> Capabilities:
    """Everything the engine can honestly run, so the tool refuses only what the engine refuses."""
    return Capabilities(
        sa_capacity=max(1, min(count, MAX_SA_CAPACITY)),
        encryption=frozenset(a for a, i in ENC_INFO.items() if not i.unavailable),
        integrity=frozenset(a for a, i in AUTH_INFO.items() if not i.unavailable and a != AuthAlg.NONE),
        udp_esp=UdpEspEncapsulation.TRANSPORT | UdpEspEncapsulation.TUNNEL,
        max_replay_window=MAX_REPLAY_WINDOW,
    )


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
    capture = read_capture(in_path)
    records = capture.records
    fw = build_firmware(sas, Direction.OUTBOUND if action == "encap" else Direction.INBOUND)
    counts: Counter[str] = Counter()
    written: list[CaptureRecord] = []
    for rec in records:
        if not rec.data:
            counts["empty"] += 1
            continue
        frame = to_frame(rec.data, rec.linktype)
        if frame is None:
            counts["wrong_ip_version"] += 1  # e.g. an IPv6 packet in a LINKTYPE_IPV4 record
            continue
        if action == "encap":
            res = fw.transmit(frame, 0, packet_offload=True)
            counts[TxOutcome(res.status).name.lower()] += 1
            if res.status == TxOutcome.OK and res.frame is not None:
                data, linktype = from_frame(res.frame, rec.linktype)
                written.append(replace(rec, data=data, linktype=linktype))
        else:
            rx = fw.receive(frame)
            if not rx.crypto_done:
                counts["no_sa" if rx.handle == 0 else "not_esp"] += 1
                continue
            name = Verdict(rx.verdict).name.lower() if rx.verdict >= 0 else CryptoStatus(rx.crypto_status).name
            counts[name] += 1
            if rx.crypto_status == CryptoStatus.SUCCESS and not rx.discard and rx.verdict == Verdict.OK:
                data, linktype = from_frame(rx.frame, rec.linktype)
                written.append(replace(rec, data=data, linktype=linktype))
    write_capture(out_path, capture, written)
    detail = ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "nothing"
    print(f"fw {action}: {len(records)} packets in, {len(written)} out ({detail})", file=out or sys.stdout)
    return 0


def handle(args: argparse.Namespace) -> int:
    try:
        return run(args.fw_action, args.sa, args.input, args.output)
    except (SaFileError, CaptureError) as exc:
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
        p.add_argument("--in", dest="input", required=True, help="input capture (pcap or pcapng)")
        p.add_argument("--out", dest="output", required=True, help="output capture, written in the input's format")
        p.set_defaults(func=handle)
    return fw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ipsec-nic")
    add_fw_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
