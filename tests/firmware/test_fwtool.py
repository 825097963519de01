"""`ipsec-nic fw encap/decap` end to end on scapy-built pcaps, checked by scapy's SecurityAssociation."""

from __future__ import annotations

import argparse

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import rdpcap, wrpcap

from firmware_model import fwtool
from firmware_model.capture_file import LINKTYPE_RAW

KEY = "00112233445566778899aabbccddeeff"
SALT = "cafebabe"

TRANSPORT = f"""
sas:
  - spi: 0x1001
    direction: outbound
    src: 192.0.2.1
    dst: 192.0.2.2
    aead: {{alg: aes-gcm-128, key: {KEY}, salt: {SALT}, icv: 16}}
    esn: true
    seq: 0xfffffff0
"""

TUNNEL_NATT = """
sas:
  - spi: 0x2002
    direction: outbound
    mode: tunnel
    src: 10.1.0.1
    dst: 10.2.0.1
    tunnel: {src: 198.51.100.1, dst: 198.51.100.2}
    encap: {type: udp, sport: 4500, dport: 4500}
    cipher: {alg: aes-cbc-128, key: 000102030405060708090a0b0c0d0e0f}
    integrity: {alg: hmac-sha256-128, key: 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f}
"""


def run(argv: list[str]) -> int:
    return fwtool.main(["fw", *argv])


def plain_packets(n: int, src="192.0.2.1", dst="192.0.2.2"):
    return [Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst=dst)
            / UDP(sport=1000 + i, dport=53) / Raw(bytes([i]) * (i + 1)) for i in range(n)]


def test_encap_transport_esn_decrypts_with_scapy(tmp_path, capsys):
    (tmp_path / "sas.yaml").write_text(TRANSPORT)
    plain = plain_packets(20)
    wrpcap(str(tmp_path / "plain.pcap"), plain)
    rc = run(["encap", "--sa", str(tmp_path / "sas.yaml"), "--in", str(tmp_path / "plain.pcap"),
              "--out", str(tmp_path / "esp.pcap")])
    assert rc == 0
    assert "20 packets in, 20 out (ok=20)" in capsys.readouterr().out
    esp = rdpcap(str(tmp_path / "esp.pcap"))
    assert len(esp) == 20
    # the sequence numbers cross the 2^32 boundary: scapy needs the ESN high half per packet (RFC 4304)
    for i, (sent, orig) in enumerate(zip(esp, plain, strict=True)):
        full = 0xFFFFFFF0 + 1 + i
        assert sent[ESP].spi == 0x1001 and sent[ESP].seq == full & 0xFFFFFFFF
        sa = SecurityAssociation(ESP, spi=0x1001, crypt_algo="AES-GCM", crypt_key=bytes.fromhex(KEY + SALT),
                                 esn_en=True, esn=full >> 32)
        clear = sa.decrypt(sent[IP])
        assert bytes(clear) == bytes(orig[IP])
    # and back: the same file used as the receiving peer
    rc = run(["decap", "--sa", str(tmp_path / "sas.yaml"), "--in", str(tmp_path / "esp.pcap"),
              "--out", str(tmp_path / "back.pcap")])
    assert rc == 0
    assert [bytes(p[IP]) for p in rdpcap(str(tmp_path / "back.pcap"))] == [bytes(p[IP]) for p in plain]


def test_tunnel_udp_encap_and_raw_linktype(tmp_path, capsys):
    (tmp_path / "sas.yaml").write_text(TUNNEL_NATT)
    inner = [IP(src="10.1.0.1", dst="10.2.0.1") / UDP(sport=7, dport=9) / Raw(b"tunnelled %d" % i) for i in range(5)]
    inner.append(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP() / Raw(b"no SA"))
    wrpcap(str(tmp_path / "plain.pcap"), inner, linktype=LINKTYPE_RAW)
    assert run(["encap", "--sa", str(tmp_path / "sas.yaml"), "--in", str(tmp_path / "plain.pcap"),
                "--out", str(tmp_path / "esp.pcap")]) == 0
    assert "6 packets in, 5 out (no_sa=1, ok=5)" in capsys.readouterr().out
    sa = SecurityAssociation(
        ESP, spi=0x2002, crypt_algo="AES-CBC", crypt_key=bytes.fromhex("000102030405060708090a0b0c0d0e0f"),
        auth_algo="SHA2-256-128", auth_key=bytes(range(32)),
    )
    out = rdpcap(str(tmp_path / "esp.pcap"))
    for pkt, orig in zip(out, inner, strict=False):
        outer = IP(bytes(pkt))
        assert (outer.src, outer.dst) == ("198.51.100.1", "198.51.100.2")
        assert outer[UDP].dport == 4500 and outer[UDP].chksum == 0  # RFC 3948 §2.1
        esp_only = IP(src=outer.src, dst=outer.dst, proto=50) / ESP(bytes(outer[UDP].payload))
        clear = sa.decrypt(esp_only)  # transport view: outer header + the inner packet (next header 4)
        assert clear[IP].proto == 4 and bytes(clear[IP].payload) == bytes(orig)


def test_tampered_packet_is_dropped_and_counted(tmp_path, capsys):
    (tmp_path / "sas.yaml").write_text(TRANSPORT)
    wrpcap(str(tmp_path / "plain.pcap"), plain_packets(3))
    run(["encap", "--sa", str(tmp_path / "sas.yaml"), "--in", str(tmp_path / "plain.pcap"),
         "--out", str(tmp_path / "esp.pcap")])
    pkts = list(rdpcap(str(tmp_path / "esp.pcap")))
    raw = bytearray(bytes(pkts[1]))
    raw[-1] ^= 1
    pkts[1] = Ether(bytes(raw))
    wrpcap(str(tmp_path / "esp.pcap"), pkts)
    capsys.readouterr()
    run(["decap", "--sa", str(tmp_path / "sas.yaml"), "--in", str(tmp_path / "esp.pcap"),
         "--out", str(tmp_path / "back.pcap")])
    assert "3 packets in, 2 out (auth_failed=1, ok=2)" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    (b"", "too short"),
    (b"\x0a\x0d\x0d\x0a" + bytes(40), "malformed pcapng file header"),
    (b"\xd4\xc3\xb2\xa1" + bytes(8), "malformed pcap file header"),
    (b"GARBAGE!" * 4, "not a pcap or pcapng file (magic 47415242)"),
])
def test_malformed_pcap_is_a_one_line_error(tmp_path, capsys, content, message):
    (tmp_path / "sas.yaml").write_text(TRANSPORT)
    (tmp_path / "bad.pcap").write_bytes(content)
    rc = run(["encap", "--sa", str(tmp_path / "sas.yaml"), "--in", str(tmp_path / "bad.pcap"),
              "--out", str(tmp_path / "out.pcap")])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and err.count("\n") == 1


def test_truncated_record_and_bad_sa_file(tmp_path, capsys):
    (tmp_path / "sas.yaml").write_text(TRANSPORT)
    wrpcap(str(tmp_path / "plain.pcap"), plain_packets(2))
    data = (tmp_path / "plain.pcap").read_bytes()
    (tmp_path / "cut.pcap").write_bytes(data[:-5])
    rc = run(["encap", "--sa", str(tmp_path / "sas.yaml"), "--in", str(tmp_path / "cut.pcap"),
              "--out", str(tmp_path / "o.pcap")])
    assert rc == 1 and "record 1 truncated" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text(TRANSPORT.replace("aes-gcm-128", "aes-gcm-999"))
    rc = run(["encap", "--sa", str(tmp_path / "bad.yaml"), "--in", str(tmp_path / "plain.pcap"),
              "--out", str(tmp_path / "o.pcap")])
    err = capsys.readouterr().err
    assert rc == 1 and "unknown algorithm 'aes-gcm-999'" in err and KEY not in err


def test_subparser_registration():
    parser = argparse.ArgumentParser(prog="ipsec-nic")
    fwtool.add_fw_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["fw", "decap", "--sa", "a", "--in", "b", "--out", "c"])
    assert args.func is fwtool.handle and (args.fw_action, args.sa, args.input, args.output) == ("decap", "a", "b", "c")
