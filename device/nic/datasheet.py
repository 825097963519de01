"""Every generated block of docs/datasheet.md, and one command that regenerates them all.

    python -m device.nic.datasheet docs/datasheet.md           # rewrite every generated block in place
    python -m device.nic.datasheet --check docs/datasheet.md   # exit 1 if a block is stale

Blocks, each between its own BEGIN/END markers (tests/contract/test_regs_datasheet.py and
tests/contract/test_datasheet_commands.py check that the document holds exactly this text):

- registers (§3): ``device.contract.regs.datasheet_tables()``, with regs' own markers;
- admin commands (§5): ``device.contract.ndis.COMMANDS`` and every ``Layout``;
- status codes (§6): NdisStatus, RejectReason, AdminStatus, TxStatus, CryptoStatus and what produces each;
- algorithms (§7): key, IV, padding and ICV sizes from ``firmware_model.algorithms``;
- card profile (§11): every profile key with its default, read from the dataclasses the loader fills.

The "what produces it" texts live here, keyed by member name; rendering fails if an enum gains a member
without one, so a new status cannot reach the code without reaching the datasheet.
Host-side only (imports the firmware model and PyYAML through device.profile); the guest never imports it.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from device import profile as card_profile
from device.contract import ndis, regs
from device.contract.algorithms import esp_align
from device.contract.enums import AuthAlg, EncAlg, Mode, UdpEspEncapsulation
from device.contract.status import NdisStatus
from firmware_model.algorithms import AUTH_INFO, ENC_INFO
from firmware_model.capabilities import UDP_ESP_NAMES, Capabilities
from firmware_model.sadb import SaRejected

# ---------------------------------------------------------------------------------------------------
# §6 texts: the situations that produce each value (keyed by member name)

NDIS_STATUS_WHEN: dict[str, str] = {
    "SUCCESS": "The command did what it says. V2_ADD_SA: at least one entry was added (see its per-entry results).",
    "NOT_ACCEPTED": "Not produced: commands run to completion, a reset never leaves one half done "
                    "(listed for NDIS parity).",
    "FAILURE": "Internal firmware error while executing the command (a bug; GET_STATS counts it in cmd_failed). "
               "It is also the NDIS send status behind every TX status other than OK.",
    "INVALID_PARAMETER": "A field value is refused: SA refusals other than capacity/unsupported (table below); "
                         "unknown or stale handle in DELETE_SA / DELETE_UDPESP_SA / UPDATE_SA / GET_SA_STATS; "
                         "V2_DELETE_SA with an unknown or repeated handle (nothing deleted); UPDATE_SA on a "
                         "non-ESN or packet-offload SA, or operation/SPI not in the bundle; v2 list with a bad "
                         "next_offset or more than 4096 entries; LIST_SAS max_entries outside 1..4096; "
                         "DELETE_UDPESP_SA naming a parser entry that is unknown or still used by another SA.",
    "RESOURCES": "SA table full: SA_CAPACITY bundles are in use (reject_capacity).",
    "NOT_SUPPORTED": "The SA asks for an algorithm or feature this card does not offer (profile `firmware:` "
                     "section) or refuses by policy: DES, CBC without integrity, IKE-type UDP encapsulation, "
                     "AH in packet offload (table below).",
    "REQUEST_ABORTED": "Not produced (listed for NDIS parity).",
    "INVALID_LENGTH": "The payload size does not fit the layout: shorter than the fixed part, stray bytes after "
                      "it, key_len/key_length not matching the key bytes, key buffer not ending the request, "
                      "empty list, a payload for GET_CAPS/GET_STATS, more than one V2_UPDATE_SA.",
    "INVALID_DATA": "A field with a fixed value holds another: NDIS_OBJECT_HEADER Type/Revision/Size, a "
                    "reserved field, or an output offload_handle that is not 0 in the request.",
    "BUFFER_TOO_SHORT": "Not produced: a response longer than resp_len is the admin queue's RESPONSE_TRUNCATED.",
    "INVALID_OID": "Unknown opcode.",
}

REJECT_WHEN: dict[str, str] = {
    "CAPACITY": "SA_CAPACITY bundles already in use",
    "UNSUPPORTED_ALGORITHM": "algorithm not in the profile, DES, 3DES/MD5 missing from the crypto library, "
                             "CBC without integrity, GCM with an integrity algorithm, GMAC with encryption, AH with GMAC",
    "BAD_KEY": "key length wrong for the algorithm, or a key outside the key buffer / key_mat",
    "BAD_ICV_LENGTH": "AES-GCM additional_info not 0, 8, 12 or 16",
    "BAD_SPI": "SPI below 256 (RFC 4303 §2.1)",
    "DUPLICATE_SPI": "an inbound SA with the same SPI, destination and protocol exists",
    "BAD_BUNDLE": "num_sas / num_ext_hdrs not 1 or 2, a 2-entry bundle that is not ESP then AH, AH with an "
                  "encryption algorithm, operation 0 or unknown",
    "BAD_ADDRESS": "source and destination of different families, IPv4 address with bytes 4..15 non-zero, "
                   "selector prefix longer than the address",
    "UNSUPPORTED_FEATURE": "IPv6, AH, ESP, tunnel, transport, ESN, UDP-ESP kind, AH+ESP or packet offload not "
                           "offered; packet offload with anything but one ESP SA; udp_encap_type IKE",
    "BAD_ENCAPSULATION": "unknown udp_esp_encapsulation bits, UDP-ESP with AH, dst_encap_port 0",
    "BAD_PARSER_ENTRY": "V1_ADD_UDPESP_SA names a parser entry that is unknown or for another (type, port)",
    "BAD_PARAMETER": "unknown flag bits, v1 flags not exactly one direction, replay window above "
                     "MAX_REPLAY_WINDOW, ADD_SA_PACKET mode not 0/1",
}

ADMIN_STATUS_WHEN: dict[str, tuple[str, str, str]] = {
    # name: (when, did the command run?, counters / ERR_CODE)
    "OK": ("Descriptor processed; fw_status holds the command's NDIS status (which may be an error)",
           "yes", "GET_STATS cmd_ok / cmd_failed"),
    "DMA_ERROR": ("Request buffer unreachable (command not run), or response buffer unreachable (the command "
                  "ran and fw_status is valid, but the response is lost: an added SA's handle is unknown)",
                  "no / yes", "DMA_ERROR; ERR_CODE = DMA_FAULT, ERR_INFO = 0x000"),
    "REQUEST_TOO_LONG": ("req_len > AQ_MAX_BUF", "no", "BAD_DESCRIPTOR"),
    "RESPONSE_TRUNCATED": ("Response longer than resp_len: its first resp_len bytes are written and resp_len is "
                           "written back with the full length", "yes", "–"),
    "BAD_DESCRIPTOR": ("reserved0..3 not zero, flag bits other than DONE/ERROR/INTERRUPT, or resp_len > "
                       "AQ_MAX_BUF", "no", "BAD_DESCRIPTOR"),
    "FIRMWARE_FAULT": ("The firmware raised instead of answering (a bug; the card keeps serving)", "unknown",
                       "ERR_CODE = FIRMWARE_FAULT, ERR_INFO = opcode"),
}

TX_STATUS_WHEN: dict[str, tuple[str, str]] = {
    "OK": ("The frame was handed to the wire (TX_PACKETS/TX_BYTES count it only if the wire took it: with no "
           "link it is dropped silently)", "TX_PACKETS, TX_BYTES; TX_CRYPTO_OK if offloaded"),
    "DMA_ERROR": ("A buffer of the frame is unreachable", "DMA_ERROR; ERR_CODE = DMA_FAULT, ERR_INFO = 0x100 | n"),
    "BAD_LENGTH": ("A descriptor with length 0, or a frame shorter than 14 bytes or longer than MTU + 18",
                   "BAD_DESCRIPTOR (one per descriptor of the frame)"),
    "BAD_HANDLE": ("IPSEC_CRYPTO with offload_handle 0; handle unknown, stale, inbound, or of the other offload "
                   "kind; tunnel_handle not 0 when the profile does not offer transport over tunnel, with "
                   "IPSEC_PACKET, or naming anything but an outbound crypto ESP SA (handle: a transport one)",
                   "TX_OFFLOAD_ERROR"),
    "OFFLOAD_FAILED": ("The firmware refused the frame: not IPv4/IPv6, IP lengths inconsistent, a fragment, no "
                       "ESP/AH where the SA needs it, SPI not the SA's, plain ESP on a UDP-ESP SA, ESP body not "
                       "a whole number of cipher blocks, transport SA given a packet of the other IP family "
                       "(packet offload), sequence number would cycle (packet offload), hard lifetime reached, packet offload with handle 0 and no selector match",
                       "TX_OFFLOAD_ERROR"),
    "BAD_DESCRIPTOR": ("Reserved field not zero, seq_hi without SEQ_HI or SEQ_HI without IPSEC_CRYPTO, unknown flag bits, both IPSEC flags, or no EOP within "
                       "min(64, LEN - 1) descriptors (that many are refused)",
                       "BAD_DESCRIPTOR (one per descriptor)"),
}

CRYPTO_STATUS_WHEN: dict[str, str] = {
    "SUCCESS": "ICV verified; crypto offload: decrypted in place; packet offload: decapsulated (DECAPSULATED). "
               "Also a crypto-offload dummy packet (next header 59, RFC 4303 §2.6), which the host discards. "
               "Meaningless when CRYPTO_DONE is clear.",
    "GENERIC_ERROR": "The SA's hard lifetime is reached (packet offload: hard_packets/hard_bytes); the frame is "
                     "indicated unchanged.",
    "TRANSPORT_AH_AUTH_FAILED": "AH ICV mismatch on a transport-mode SA (in an ESP+AH bundle: the outer AH "
                                "failed; the ESP inside was not checked).",
    "TRANSPORT_ESP_AUTH_FAILED": "ESP ICV mismatch (GCM tag, GMAC or HMAC) on a transport-mode SA (in an ESP+AH "
                                 "bundle: AH verified, the ESP inside failed).",
    "TUNNEL_AH_AUTH_FAILED": "As TRANSPORT_AH_AUTH_FAILED on a tunnel-mode SA.",
    "TUNNEL_ESP_AUTH_FAILED": "As TRANSPORT_ESP_AUTH_FAILED on a tunnel-mode SA.",
    "INVALID_PACKET_SYNTAX": "IP lengths inconsistent or truncated, ESP body shorter than IV + ICV + 2 or not a "
                             "whole number of cipher blocks, pad length larger than the payload or padding "
                             "bytes not 1, 2, 3, ... (RFC 4303 §2.4), UDP-ESP payload shorter than an ESP "
                             "header, packet offload tunnel SA whose inner packet is not IP.",
    "INVALID_PROTOCOL": "The packet's IPsec header is not what the SA expects: plain ESP for a UDP-ESP SA, ESP "
                        "without the AH of an ESP+AH bundle, or an SPI that is not the element's.",
    "REPLAY": "Defined for packet offload but not written by this revision: a frame refused by the anti-replay "
              "window is dropped and counted in RX_REPLAY_DROP, never indicated.",
}

# §11 texts: profile keys -> (allowed values, meaning). Order here is the table's order.
PROFILE_KEYS: dict[str, tuple[str, str]] = {
    "pci.vendor_id": ("0x0001..0xFFFE", "PCI vendor ID"),
    "pci.device_id": ("0..0xFFFE", "PCI device ID"),
    "pci.subsystem_vendor_id": ("0..0xFFFF; default = vendor_id", "subsystem vendor ID"),
    "pci.subsystem_id": ("0..0xFFFF", "subsystem ID"),
    "pci.class_code": ("0..0xFFFFFF", "class code"),
    "pci.revision": ("0..0xFF", "revision ID"),
    "nic.mac": ("six hex bytes, not multicast", "MAC address (MAC_LO/MAC_HI, serial number)"),
    "nic.tx_queues": ("1..8", "NUM_TXQ"),
    "nic.rx_queues": ("1..8", "NUM_RXQ"),
    "nic.ring_size": ("power of two, 2..32768", "MAX_RING_SIZE"),
    "nic.msix_vectors": ("1..128; default 1 + max(tx_queues, rx_queues)", "MSI-X table size, NUM_MSIX"),
    "nic.mtu": ("68..max_mtu; default min(1500, max_mtu)", "MTU register reset value"),
    "nic.max_mtu": ("68..9216", "MAX_MTU"),
    "nic.admin_queue_size": ("power of two, 2..4096", "AQ_MAX_LEN"),
    "nic.admin_buffer_size": ("4096..1048576", "AQ_MAX_BUF"),
    "nic.hw_version": ('"major.minor[.patch]"', "HW_VERSION"),
    "nic.mirror_mmap": ("true/false", "Offer the mirror BAR (BAR4) for mmap; false: its reads are trapped and "
                        "QEMU keeps posting BAR writes (§2)"),
    "firmware.sa_capacity": ("1..1048575", "SA_CAPACITY, CAPS sa_offload_capacity"),
    "firmware.encryption": ("list of names (§7.1); des-cbc is always refused", "ENC_ALGOS"),
    "firmware.integrity": ("list of names (§7.1)", "AUTH_ALGOS"),
    "firmware.esn": ("true/false", "ESN SAs accepted"),
    "firmware.udp_esp": ("true (= transport, tunnel), false, or a list of transport, tunnel, "
                         "transport-over-tunnel, udp-transport-over-tunnel (the last two only with "
                         "transport_tunnel_combined: true, else the profile is refused)",
                         "UDP_ESP kinds accepted in udp_esp_encapsulation; the last two are the UDP-encapsulated "
                         "layers of transport over tunnel (§7.3), also v1 parse flags TPTOVERTUN_OTHER, "
                         "TPT_OVER_PURE_TUN_OTHER"),
    "firmware.ipv6": ("true/false", "IPv6 SAs; also reported as IPv6 extension-header support"),
    "firmware.ipv4_options": ("true/false", "IPv4 packets with options are processed (else indicated "
                                            "unprocessed)"),
    "firmware.transport": ("true/false", "transport-mode SAs accepted"),
    "firmware.tunnel": ("true/false", "tunnel-mode SAs accepted (NDIS needs TRUE for any offload)"),
    "firmware.transport_tunnel_combined": ("true/false", "CAPS transport_tunnel_combined: crypto-offload transport "
                                                         "over tunnel, plain ESP layers; UDP-encapsulated layers "
                                                         "as firmware.udp_esp offers them (§7.3, §7.6)"),
    "firmware.ah": ("true/false", "AH SAs accepted"),
    "firmware.esp": ("true/false", "ESP SAs accepted"),
    "firmware.ah_esp_combined": ("true/false", "ESP+AH bundles accepted"),
    "firmware.lso": ("false (true is refused: the card never segments)", "FEATURES.LSO, CAPS lso_supported"),
    "firmware.max_replay_window": ("0..65536", "MAX_REPLAY_WINDOW; largest packet-offload replay_window"),
    "firmware.packet_offload": ("true/false", "ADD_SA_PACKET and IPSEC_PACKET available"),
    "wire.type": ("none, loopback, dgram, stream, cable", "wire backend (§11.2)"),
    "wire.path": ("socket path; required for dgram, stream, cable", "the card's own socket (stream client: "
                                                                   "the server's)"),
    "wire.peer": ("socket path; required for cable", "where dgram/cable datagrams go (§11.2)"),
    "wire.mode": ("server (default) or client; stream only", "who listens on a stream wire"),
    "wire.pcap": ("file path", "record every frame sent and received (pcap)"),
}


# ---------------------------------------------------------------------------------------------------
# rendering helpers


def _need(texts: Mapping[str, object], members: Iterable[str], what: str) -> None:
    names = list(members)
    missing = [n for n in names if n not in texts]
    extra = [n for n in texts if n not in names]
    if missing or extra:
        raise ValueError(f"{what}: datasheet text missing for {missing}, stale for {extra} (device/nic/datasheet.py)")


def _table(header: Iterable[str], rows: Iterable[Iterable[object]]) -> list[str]:
    head = list(header)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _flag_values(e: type[enum.IntEnum] | type[enum.IntFlag]) -> str:
    return ", ".join(f"{m.name} = {int(m):#x}" for m in e.__members__.values())


# ---------------------------------------------------------------------------------------------------
# §5 admin commands


def admin_command_tables() -> str:
    out = ["### 5.3 Opcodes", ""]
    out += _table(("Opcode", "Name", "Mirrors", "Request", "Response", "Semantics"),
                  ((f"0x{int(c.opcode):04X}", c.opcode.name, c.ndis, c.request, c.response, c.semantics)
                   for c in ndis.COMMANDS))
    out += ["", "### 5.4 Constants", ""]
    constants = (EncAlg, AuthAlg, UdpEspEncapsulation, ndis.V2AddFlags,
                 ndis.V2SaFlags, ndis.V2Operation, ndis.V1Operation, ndis.V1ConfAlgo, ndis.V1IntegrityAlgo,
                 ndis.V1SaFlags, ndis.UdpEncapType, ndis.V1UdpEspParseFlags, Mode, ndis.SaListFlags)
    out += _table(("Type", "Values"), ((c.__name__, _flag_values(c)) for c in constants))
    out += ["", "### 5.5 Structures", "",
            "Offsets are from the start of the structure; `u8[N]` fields are raw bytes, everything else is "
            "little-endian. A nested structure's fields follow in its own table."]
    for layout in ndis.LAYOUTS.values():
        out += ["", layout.markdown()]
        if layout.doc:
            out += ["", layout.doc]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------
# §6 status codes


def status_code_tables() -> str:
    _need(NDIS_STATUS_WHEN, NdisStatus.__members__, "NdisStatus")
    _need(REJECT_WHEN, ndis.RejectReason.__members__, "RejectReason")
    _need(ADMIN_STATUS_WHEN, regs.AdminStatus.__members__, "AdminStatus")
    _need(TX_STATUS_WHEN, regs.TxStatus.__members__, "TxStatus")
    _need(CRYPTO_STATUS_WHEN, regs.CryptoStatus.__members__, "CryptoStatus")
    out = ["### 6.1 Firmware status (AdminDesc.fw_status, V2_ADD_SA_RESULT.status, STATUS_ENTRY.status)", ""]
    out += _table(("Value", "NDIS_STATUS_*", "Returned when"),
                  ((f"0x{int(s):08X}", s.name, NDIS_STATUS_WHEN[s.name]) for s in NdisStatus))
    out += ["", "### 6.2 SA refusals (every SA add; GET_STATS counter reject_*)", ""]
    out += _table(("RejectReason", "Status", "Counter", "Cause"),
                  ((r.name, SaRejected(r, "").status.name, f"reject_{r.name.lower()}", REJECT_WHEN[r.name])
                   for r in ndis.RejectReason))
    out += ["", "### 6.3 AdminStatus (AdminDesc.status)", ""]
    out += _table(("Value", "Name", "When", "Command ran", "Counted in / reported"),
                  ((f"0x{int(s):X}", s.name, *ADMIN_STATUS_WHEN[s.name]) for s in regs.AdminStatus))
    out += ["", "### 6.4 TxStatus (TxDesc.wb_status)", ""]
    out += _table(("Value", "Name", "When", "Counted in"),
                  ((f"0x{int(s):X}", s.name, *TX_STATUS_WHEN[s.name]) for s in regs.TxStatus))
    out += ["", "### 6.5 CryptoStatus (RxDesc.crypto_status, valid when CRYPTO_DONE is set)", ""]
    out += _table(("Value", "Name", "When"),
                  ((f"0x{int(s):X}", s.name, CRYPTO_STATUS_WHEN[s.name]) for s in regs.CryptoStatus))
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------
# §7 algorithm geometry


def algorithm_tables() -> str:
    out = ["ESP encryption (SA_V2.encryption_algorithm; v1 conf_algo maps NONE and TRIPLE_DES):", ""]
    rows = []
    for alg, info in sorted(ENC_INFO.items(), key=lambda kv: int(kv[0])):
        key = info.key_len + info.salt_len
        key_text = f"{key} ({info.key_len} + {info.salt_len} salt)" if info.salt_len else str(key)
        icv = "/".join(str(n) for n in info.icv_lens) + " (additional_info; 0 = 16)" if info.icv_lens \
            else "from the integrity algorithm"
        rows.append((info.name, f"{int(EncAlg(alg)):#05x}", key_text, info.iv_len, esp_align(info.block), icv))
    out += _table(("Name", "Identifier", "key_length (bytes)", "IV (bytes)", "Pad to (bytes)", "ICV (bytes)"),
                  rows)
    out += ["", "Integrity (SA_V2.authentication_algorithm; v1 integrity_algo maps MD5 and SHA):", ""]
    rows = []
    for alg, info in sorted(AUTH_INFO.items(), key=lambda kv: int(kv[0])):
        if alg == AuthAlg.NONE:
            continue
        key = info.key_len + info.salt_len
        key_text = f"{key} ({info.key_len} + {info.salt_len} salt)" if info.salt_len else str(key)
        use = "ESP with NULL encryption (IV 8, pad to 4); not AH (§12.1 decision 23)" if info.kind == "gmac" \
            else "ESP with CBC or NULL encryption, or AH"
        rows.append((info.name, f"{int(alg):#04x}", key_text, info.icv_len, use))
    out += _table(("Name", "Identifier", "key_length (bytes)", "ICV (bytes)", "Used with"), rows)
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------
# §11 card profile


def _profile_defaults() -> dict[str, object]:
    """Every key's effective default, as the loader computes it for an empty profile."""
    p = card_profile.profile_from_dict({})
    values: dict[str, object] = {}
    for section, obj in (("pci", p.pci), ("nic", p.nic), ("wire", p.wire)):
        for f in dataclasses.fields(obj):
            values[f"{section}.{f.name}"] = getattr(obj, f.name)
    caps = Capabilities.from_profile({})
    for f in dataclasses.fields(caps):
        values[f"firmware.{f.name}"] = getattr(caps, f.name)
    return values


def _default_text(key: str, value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if key == "nic.mac":
        return ":".join(f"{b:02x}" for b in value)  # type: ignore[union-attr]
    if key == "nic.hw_version":
        return f'"{regs.decode_version(value)}"'  # type: ignore[arg-type]
    if key == "firmware.udp_esp":
        return "[" + ", ".join(n for n, f in UDP_ESP_NAMES.items() if f & value) + "]"  # type: ignore[operator]
    if isinstance(value, frozenset):
        info = ENC_INFO if key == "firmware.encryption" else AUTH_INFO
        return "[" + ", ".join(info[a].name for a in sorted(value, key=int)) + "]"
    if key.startswith("pci.") and isinstance(value, int):
        digits = {"pci.class_code": 6, "pci.revision": 2}.get(key, 4)
        return f"0x{value:0{digits}X}"
    return str(value)


def profile_table() -> str:
    defaults = _profile_defaults()
    _need(PROFILE_KEYS, defaults, "card profile keys")
    rows = ((f"`{k}`", _default_text(k, defaults[k]), values, meaning)
            for k, (values, meaning) in PROFILE_KEYS.items())
    return "\n".join(_table(("Key", "Default", "Values", "Meaning"), rows)) + "\n"


# ---------------------------------------------------------------------------------------------------
# blocks and the command


@dataclass(frozen=True)
class Block:
    name: str
    begin: str
    end: str
    render: Callable[[], str]

    def section(self) -> str:
        return f"{self.begin}\n{self.render()}{self.end}\n"

    def replace(self, text: str) -> str:
        if text.count(self.begin) != 1:
            raise ValueError(f"datasheet must hold exactly one marker {self.begin!r}")
        start = text.index(self.begin)
        end = text.index(self.end, start) + len(self.end)
        if text[end:end + 1] == "\n":
            end += 1
        return text[:start] + self.section() + text[end:]


def _block(name: str, source: str, render: Callable[[], str]) -> Block:
    return Block(name, f"<!-- BEGIN GENERATED from {source}: {render.__name__}() -->",
                 f"<!-- END GENERATED {name} -->", render)


BLOCKS: tuple[Block, ...] = (
    Block("registers", regs.DATASHEET_BEGIN, regs.DATASHEET_END, regs.datasheet_tables),
    _block("admin commands", "device/contract/ndis.py", admin_command_tables),
    _block("status codes", "device/contract/status.py + device/contract/regs.py", status_code_tables),
    _block("algorithms", "firmware_model/algorithms.py", algorithm_tables),
    _block("card profile", "device/profile.py + firmware_model/capabilities.py", profile_table),
)


def regenerate(text: str) -> str:
    """``text`` (docs/datasheet.md) with every generated block replaced by the current rendering."""
    for block in BLOCKS:
        text = block.replace(text)
    return text


def main(argv: list[str]) -> int:
    check = "--check" in argv
    paths = [a for a in argv if a != "--check"] or ["docs/datasheet.md"]
    stale = 0
    for path in map(Path, paths):
        text = path.read_text(encoding="utf-8")
        updated = regenerate(text)
        if updated == text:
            continue
        if check:
            print(f"{path}: generated sections are stale; run python -m device.nic.datasheet {path}")
            stale += 1
        else:
            path.write_text(updated, encoding="utf-8")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
