"""`ipsec-nic fw` on capture files as people have them: scapy's IPv4/IPv6 link types, pcapng (scapy's writer
and one built by hand from draft-ietf-opsawg-pcapng), ns and big-endian classic pcap, and broken files."""

from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import PcapNgWriter, RawPcapReader, RawPcapWriter, rdpcap, wrpcap

from firmware_model import fwtool
from firmware_model.capture_file import (
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_RAW,
    Capture,
    CaptureFormat,
    CaptureRecord,
    read_capture,
    write_capture,
)

KEY = "00112233445566778899aabbccddeeff"
SALT = "cafebabe"
SAS = f"""
sas:
  - spi: 0x1001
    direction: outbound
    src: 192.0.2.1
    dst: 192.0.2.2
    aead: {{alg: aes-gcm-128, key: {KEY}, salt: {SALT}, icv: 16}}
  - spi: 0x1006
    direction: outbound
    src: 2001:db8::1
    dst: 2001:db8::2
    aead: {{alg: aes-gcm-128, key: {KEY}, salt: {SALT}, icv: 16}}
"""
V4_IN_V6_TUNNEL = f"""
sas:
  - spi: 0x3003
    direction: outbound
    mode: tunnel
    src: 10.1.0.1
    dst: 10.2.0.1
    tunnel: {{src: 2001:db8::a, dst: 2001:db8::b}}
    aead: {{alg: aes-gcm-128, key: {KEY}, salt: {SALT}, icv: 16}}
"""
PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"


def fw(tmp_path, action: str, sas: str, src: str, dst: str) -> int:
    (tmp_path / "sas.yaml").write_text(sas)
    return fwtool.main(["fw", action, "--sa", str(tmp_path / "sas.yaml"), "--in", str(tmp_path / src),
                        "--out", str(tmp_path / dst)])


def decrypt(spi: int, pkt):
    sa = SecurityAssociation(ESP, spi=spi, crypt_algo="AES-GCM", crypt_key=bytes.fromhex(KEY + SALT))
    return sa.decrypt(pkt)


def ip_packets():
    v4 = [IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=1000 + i, dport=53) / Raw(b"v4 %d" % i)
          for i in range(4)]
    v6 = [IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=2000 + i, dport=53) / Raw(b"v6 %d" % i)
          for i in range(4)]
    return v4, v6


def linktype_of(path) -> int:
    with RawPcapReader(str(path)) as r:
        return r.linktype


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_scapy_ip_linktypes_228_229_round_trip(tmp_path, capsys, family):
    v4, v6 = ip_packets()
    plain = v4 if family == "v4" else v6
    wrpcap(str(tmp_path / "plain.pcap"), plain)  # scapy picks LINKTYPE_IPV4/IPV6 for IP packets
    expected = LINKTYPE_IPV4 if family == "v4" else LINKTYPE_IPV6
    assert linktype_of(tmp_path / "plain.pcap") == expected
    assert fw(tmp_path, "encap", SAS, "plain.pcap", "esp.pcap") == 0
    assert "4 packets in, 4 out (ok=4)" in capsys.readouterr().out
    assert linktype_of(tmp_path / "esp.pcap") == expected
    spi = 0x1001 if family == "v4" else 0x1006
    layer = IP if family == "v4" else IPv6
    for sent, orig in zip(rdpcap(str(tmp_path / "esp.pcap")), plain, strict=True):
        assert sent[ESP].spi == spi
        assert bytes(decrypt(spi, sent[layer])) == bytes(orig)
    assert fw(tmp_path, "decap", SAS, "esp.pcap", "back.pcap") == 0
    assert [bytes(p) for p in rdpcap(str(tmp_path / "back.pcap"))] == [bytes(p) for p in plain]


def test_pcapng_from_scapy_two_interfaces_round_trip(tmp_path, capsys):
    v4, v6 = ip_packets()
    eth = [Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / p for p in v4]
    for p in eth:
        p.sniffed_on = "eth0"
    for p in v6:
        p.sniffed_on = "tun0"
    mixed = [eth[0], v6[0], eth[1], v6[1], eth[2], v6[2]]
    for i, p in enumerate(mixed):
        p.time = 1_700_000_000 + i / 8  # exact in binary and in µs
    with PcapNgWriter(str(tmp_path / "plain.pcapng")) as w:
        w.write(mixed)
    cap = read_capture(tmp_path / "plain.pcapng")
    assert cap.fmt is CaptureFormat.PCAPNG
    assert [r.linktype for r in cap.records] == [LINKTYPE_ETHERNET, LINKTYPE_IPV6] * 3

    assert fw(tmp_path, "encap", SAS, "plain.pcapng", "esp.pcapng") == 0
    assert "6 packets in, 6 out (ok=6)" in capsys.readouterr().out
    assert (tmp_path / "esp.pcapng").read_bytes()[:4] == PCAPNG_MAGIC  # output keeps the input's format
    out = rdpcap(str(tmp_path / "esp.pcapng"))
    assert [float(p.time) for p in out] == [float(p.time) for p in mixed]
    for sent, orig in zip(out, mixed, strict=True):
        if Ether in orig:
            assert isinstance(sent, Ether) and bytes(decrypt(0x1001, sent[IP])) == bytes(orig[IP])
        else:
            assert isinstance(sent, IPv6) and bytes(decrypt(0x1006, sent)) == bytes(orig)
    assert fw(tmp_path, "decap", SAS, "esp.pcapng", "back.pcapng") == 0
    assert [bytes(p) for p in rdpcap(str(tmp_path / "back.pcapng"))] == [bytes(p) for p in mixed]


def _block(btype: int, body: bytes) -> bytes:
    body += bytes(-len(body) % 4)
    return struct.pack("<II", btype, 12 + len(body)) + body + struct.pack("<I", 12 + len(body))


def handmade_pcapng(frames: list[bytes], ts_ns: list[int]) -> bytes:
    """SHB (§4.1), IDB with if_tsresol = 10^-9 (§4.2, option 9), one EPB per frame (§4.3)."""
    shb = _block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    tsresol = struct.pack("<HHB", 9, 1, 9) + bytes(3) + struct.pack("<HH", 0, 0)
    idb = _block(1, struct.pack("<HHI", LINKTYPE_ETHERNET, 0, 0) + tsresol)
    epbs = b"".join(_block(6, struct.pack("<IIIII", 0, ts >> 32, ts & 0xFFFFFFFF, len(f), len(f)) + f)
                    for f, ts in zip(frames, ts_ns, strict=True))
    return shb + idb + epbs


def test_handmade_pcapng_with_ns_resolution(tmp_path, capsys):
    v4, _ = ip_packets()
    frames = [bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / p) for p in v4]
    ts = [1_700_000_000_123_456_789 + i * 1000 for i in range(len(frames))]
    (tmp_path / "plain.pcapng").write_bytes(handmade_pcapng(frames, ts))
    cap = read_capture(tmp_path / "plain.pcapng")
    assert [r.data for r in cap.records] == frames
    assert [(r.ts_ticks, r.ts_resolution) for r in cap.records] == [(t, 10**9) for t in ts]
    assert fw(tmp_path, "encap", SAS, "plain.pcapng", "esp.pcapng") == 0
    assert "4 packets in, 4 out (ok=4)" in capsys.readouterr().out
    out = read_capture(tmp_path / "esp.pcapng")
    # scapy's writer has µs resolution: the ns timestamps come back truncated to µs, never rounded up
    assert [r.ts_ticks * 10**9 // r.ts_resolution for r in out.records] == [t // 1000 * 1000 for t in ts]


@pytest.mark.parametrize("endian, nano", [(">", True), (">", False), ("<", True)])
def test_classic_byte_order_and_ns_magic_are_kept(tmp_path, endian, nano):
    v4, _ = ip_packets()
    unit = 10**9 if nano else 10**6
    with RawPcapWriter(str(tmp_path / "plain.pcap"), linktype=LINKTYPE_RAW, endianness=endian, nano=nano) as w:
        w.write_header(None)
        for i, p in enumerate(v4):
            w.write_packet(bytes(p), sec=1_700_000_000 + i, usec=unit - 1 - i)
    assert fw(tmp_path, "encap", SAS, "plain.pcap", "esp.pcap") == 0
    raw = (tmp_path / "esp.pcap").read_bytes()
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    assert struct.unpack(endian + "I", raw[:4])[0] == magic
    with RawPcapReader(str(tmp_path / "esp.pcap")) as r:
        assert r.linktype == LINKTYPE_RAW
        stamps = [(m.sec, m.usec) for _, m in r]
    assert stamps == [(1_700_000_000 + i, unit - 1 - i) for i in range(4)]


def test_ipv4_inner_in_ipv6_tunnel_switches_classic_to_raw_ip(tmp_path, capsys):
    inner = [IP(src="10.1.0.1", dst="10.2.0.1") / UDP(sport=7, dport=9) / Raw(b"x%d" % i) for i in range(3)]
    wrpcap(str(tmp_path / "plain.pcap"), inner)
    assert linktype_of(tmp_path / "plain.pcap") == LINKTYPE_IPV4
    assert fw(tmp_path, "encap", V4_IN_V6_TUNNEL, "plain.pcap", "esp.pcap") == 0
    assert "3 packets in, 3 out (ok=3)" in capsys.readouterr().out
    # an IPv6 packet cannot be a LINKTYPE_IPV4 record: the output file says what it holds
    assert linktype_of(tmp_path / "esp.pcap") == LINKTYPE_IPV6
    out = rdpcap(str(tmp_path / "esp.pcap"))
    assert all(p[IPv6].src == "2001:db8::a" and p[ESP].spi == 0x3003 for p in out)


def test_mixed_families_in_a_classic_ip_file_are_written_as_raw_ip(tmp_path):
    v4, v6 = ip_packets()
    records = [CaptureRecord(bytes(v4[0]), LINKTYPE_IPV4, 1, 1), CaptureRecord(bytes(v6[0]), LINKTYPE_IPV6, 2, 1)]
    write_capture(tmp_path / "o.pcap", Capture(CaptureFormat.PCAP, []), records)
    assert linktype_of(tmp_path / "o.pcap") == LINKTYPE_RAW
    assert [r.data for r in read_capture(tmp_path / "o.pcap").records] == [bytes(v4[0]), bytes(v6[0])]


def test_wrong_family_for_the_link_type_is_counted_not_guessed(tmp_path, capsys):
    v4, v6 = ip_packets()
    with RawPcapWriter(str(tmp_path / "plain.pcap"), linktype=LINKTYPE_IPV4) as w:
        w.write_header(None)
        w.write_packet(bytes(v4[0]), sec=1, usec=0)
        w.write_packet(bytes(v6[0]), sec=2, usec=0)
    assert fw(tmp_path, "encap", SAS, "plain.pcap", "esp.pcap") == 0
    assert "2 packets in, 1 out (ok=1, wrong_ip_version=1)" in capsys.readouterr().out


def good_pcapng(tmp_path) -> bytes:
    v4, _ = ip_packets()
    frames = [bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / p) for p in v4]
    return handmade_pcapng(frames, [i * 1000 for i in range(len(frames))])


@pytest.mark.parametrize("mangle, message", [
    (lambda b: b[:-6], "record 3: PcapNg: Invalid Block body length"),
    (lambda b: b[:-2], "record 3: PcapNg: Could not read blocklen after block body"),
    (lambda b: b + b"\x0a\x0d", "record 4 truncated at byte"),
    (lambda b: b[:-4] + struct.pack("<I", 999), "record 3: PcapNg: Invalid pcapng block (bad blocklen)"),
    (lambda b: b.replace(struct.pack("<HHI", 1, 0, 0), struct.pack("<HHI", 105, 0, 0), 1),
     "record 0: link type 105 not supported"),
])
def test_broken_pcapng_is_a_one_line_error_naming_the_record(tmp_path, capsys, mangle, message):
    (tmp_path / "bad.pcapng").write_bytes(mangle(good_pcapng(tmp_path)))
    assert fw(tmp_path, "encap", SAS, "bad.pcapng", "o.pcapng") == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and str(tmp_path / "bad.pcapng") in err


def test_classic_errors_cut_header_snaplen_and_link_type(tmp_path, capsys):
    v4, _ = ip_packets()
    wrpcap(str(tmp_path / "plain.pcap"), v4)
    data = (tmp_path / "plain.pcap").read_bytes()
    (tmp_path / "cut.pcap").write_bytes(data + data[24:30])  # a record header cut after 6 bytes
    assert fw(tmp_path, "encap", SAS, "cut.pcap", "o.pcap") == 1
    assert "record 4 truncated at byte" in capsys.readouterr().err
    with RawPcapWriter(str(tmp_path / "snap.pcap"), linktype=LINKTYPE_IPV4) as w:
        w.write_header(None)
        w.write_packet(bytes(v4[0])[:20], sec=1, usec=0, wirelen=len(v4[0]))
    assert fw(tmp_path, "encap", SAS, "snap.pcap", "o.pcap") == 1
    assert "record 0 was captured cut short (20 of" in capsys.readouterr().err
    with RawPcapWriter(str(tmp_path / "wifi.pcap"), linktype=105) as w:
        w.write_header(None)
    assert fw(tmp_path, "encap", SAS, "wifi.pcap", "o.pcap") == 1
    assert "the file header: link type 105 not supported" in capsys.readouterr().err
