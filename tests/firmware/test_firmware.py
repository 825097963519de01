"""Firmware facade: NDIS command semantics and the receive/transmit rules, checked against scapy."""

from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.ipsec import ESP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from device.contract import ndis
from device.contract.enums import EncAlg, Mode, UdpEspEncapsulation
from device.contract.ndis import NdisStatus, Opcode, SaListFlags
from device.contract.status import CryptoStatus
from firmware_model.capabilities import Capabilities
from firmware_model.firmware import Firmware, TxOutcome

from .fw_builders import GCM_KEY, SALT, A, B, add_sa_ex, esp_frame, scapy_gcm, v2_entry

OK = NdisStatus.SUCCESS


def add(fw: Firmware, spi: int, **kw) -> int:
    status, resp = fw.execute(Opcode.V2_ADD_SA_EX, add_sa_ex(spi, **kw))
    assert status == OK, fw.last_error
    return ndis.HandleResponse.unpack(resp).offload_handle


def list_sas(fw: Firmware) -> list[ndis.SaListEntry]:
    status, resp = fw.execute(Opcode.LIST_SAS, ndis.ListSasRequest(0, 100).pack())
    assert status == OK
    return ndis.unpack_list_sas(resp)[1]


# ---- command semantics -------------------------------------------------------------------------------


def test_v2_add_sa_partial_success_gives_null_handle_for_failed_entries():
    fw = Firmware(Capabilities())
    req = ndis.pack_v2_add_sa_list([
        v2_entry(0x1001, inbound=True),
        v2_entry(0x1002, inbound=True, enc_id=EncAlg.DES_CBC, key=bytes(8)),  # DES is refused
        v2_entry(0x1003, inbound=True, key=GCM_KEY),  # key without salt: wrong length
        v2_entry(0x1004, inbound=True),
    ])
    status, resp = fw.execute(Opcode.V2_ADD_SA, req)
    results = ndis.unpack_counted(resp, ndis.V2_ADD_SA_RESULT)
    assert status == OK
    assert [r.offload_handle != 0 for r in results] == [True, False, False, True]
    assert results[1].status == NdisStatus.NOT_SUPPORTED
    assert results[2].status == NdisStatus.INVALID_PARAMETER
    assert len(fw.sadb) == 2
    st = fw.stats()
    assert st.reject_unsupported_algorithm == 1 and st.reject_bad_key == 1


def test_v2_add_sa_fails_when_nothing_added():
    fw = Firmware(Capabilities())
    req = ndis.pack_v2_add_sa_list([v2_entry(0x1001, inbound=True, key=GCM_KEY)])
    status, resp = fw.execute(Opcode.V2_ADD_SA, req)
    assert status == NdisStatus.INVALID_PARAMETER
    assert [r.offload_handle for r in ndis.unpack_counted(resp, ndis.V2_ADD_SA_RESULT)] == [0]
    assert len(fw.sadb) == 0


def test_malformed_v2_list_adds_nothing():
    fw = Firmware(Capabilities())
    good = ndis.pack_v2_add_sa_list([v2_entry(0x1001, inbound=True), v2_entry(0x1002, inbound=True)])
    status, _ = fw.execute(Opcode.V2_ADD_SA, good[:-3])  # second entry's key cut short
    assert status == NdisStatus.INVALID_LENGTH
    assert len(fw.sadb) == 0


def test_capacity_exhaustion_reports_resources_and_keeps_table_intact():
    fw = Firmware(Capabilities(sa_capacity=2))
    req = ndis.pack_v2_add_sa_list([v2_entry(0x1001 + i, inbound=True) for i in range(3)])
    status, resp = fw.execute(Opcode.V2_ADD_SA, req)
    results = ndis.unpack_counted(resp, ndis.V2_ADD_SA_RESULT)
    assert status == OK
    assert results[2] == ndis.V2AddSaResult(0, NdisStatus.RESOURCES)
    status, _ = fw.execute(Opcode.V2_ADD_SA_EX, add_sa_ex(0x2000, inbound=False))
    assert status == NdisStatus.RESOURCES
    assert len(fw.sadb) == 2 and fw.stats().reject_capacity == 2
    # the two SAs that made it still work
    assert fw.receive(esp_frame(0x1002)).crypto_status == CryptoStatus.SUCCESS


def test_delete_unknown_and_stale_handles():
    fw = Firmware(Capabilities())
    h = add(fw, 0x1001, inbound=True)
    assert fw.execute(Opcode.V1_DELETE_SA, ndis.V1DeleteSa(h ^ 1).pack())[0] == NdisStatus.INVALID_PARAMETER
    assert fw.execute(Opcode.V1_DELETE_SA, ndis.V1DeleteSa(0).pack())[0] == NdisStatus.INVALID_PARAMETER
    assert fw.execute(Opcode.V1_DELETE_SA, ndis.V1DeleteSa(h).pack())[0] == OK
    h2 = add(fw, 0x1001, inbound=True)  # reuses the slot with a new generation
    assert h2 != h and h2 & 0xFFFFF == h & 0xFFFFF
    assert fw.execute(Opcode.V1_DELETE_SA, ndis.V1DeleteSa(h).pack())[0] == NdisStatus.INVALID_PARAMETER
    assert len(fw.sadb) == 1


def test_v2_delete_list_is_all_or_nothing():
    fw = Firmware(Capabilities())
    h1, h2 = add(fw, 0x1001, inbound=True), add(fw, 0x1002, inbound=True)
    status, resp = fw.execute(Opcode.V2_DELETE_SA, ndis.pack_v2_delete_sa_list([h1, 0x80abcdef, h2]))
    assert status == NdisStatus.INVALID_PARAMETER
    assert [e.status for e in ndis.unpack_counted(resp, ndis.STATUS_ENTRY)] == [OK, NdisStatus.INVALID_PARAMETER, OK]
    assert len(fw.sadb) == 2
    status, _ = fw.execute(Opcode.V2_DELETE_SA, ndis.pack_v2_delete_sa_list([h1, h1]))
    assert status == NdisStatus.INVALID_PARAMETER and len(fw.sadb) == 2
    status, _ = fw.execute(Opcode.V2_DELETE_SA, ndis.pack_v2_delete_sa_list([h1, h2]))
    assert status == OK and len(fw.sadb) == 0


def test_update_sa_rules_and_esn_receive():
    fw = Firmware(Capabilities())
    plain = add(fw, 0x1001, inbound=True)
    esn = add(fw, 0x1002, inbound=True, esn=True, hi=0)
    upd = ndis.V2UpdateSa

    def update(handle, spi, hi, op=ndis.V2Operation.ESP):
        return fw.execute(Opcode.V2_UPDATE_SA, upd(handle, op, spi, hi).pack())[0]

    assert update(plain, 0x1001, 5) == NdisStatus.INVALID_PARAMETER  # not an ESN SA
    assert update(0x80012345, 0x1002, 5) == NdisStatus.INVALID_PARAMETER  # unknown handle
    assert update(esn, 0x1003, 5) == NdisStatus.INVALID_PARAMETER  # SPI not in the bundle
    assert update(esn, 0x1002, 5, ndis.V2Operation.AH) == NdisStatus.INVALID_PARAMETER
    # scapy sends with ESN high half 5: the card (high half 0, retry 1) cannot verify it ...
    frame = esp_frame(0x1002, seq=7, esn_en=True, esn=5)
    rx = fw.receive(frame)
    assert rx.crypto_done and rx.crypto_status == CryptoStatus.TRANSPORT_ESP_AUTH_FAILED
    assert rx.frame == frame  # failed packets are indicated unchanged
    # ... until the host pushes the new high-order bits
    assert update(esn, 0x1002, 5) == OK
    assert fw.receive(frame).crypto_status == CryptoStatus.SUCCESS
    # UPDATE_SA carries exactly one update (datasheet decision 2)
    twice = upd(esn, ndis.V2Operation.ESP, 0x1002, 6).pack() * 2
    assert fw.execute(Opcode.V2_UPDATE_SA, twice)[0] == NdisStatus.INVALID_LENGTH


def v1_udpesp(spi: int, *, inbound: bool = True, entry: int = 0, port: int = 4500, auth_key: bytes = bytes(20)):
    sa = ndis.SaV1(ndis.V1Operation.ENCRYPT, spi, ndis.AlgoInfoV1(ndis.V1IntegrityAlgo.SHA, len(auth_key)),
                   ndis.AlgoInfoV1(ndis.V1ConfAlgo.NONE, 0))
    flags = ndis.V1SaFlags.INBOUND if inbound else ndis.V1SaFlags.OUTBOUND
    return ndis.V1AddUdpEspSa(
        ndis.addr4(A), b"\xff" * 4, ndis.addr4(B), b"\xff" * 4, 17, 0, 0, bytes(4), bytes(4), flags, 1,
        (sa, ndis.SaV1(), ndis.SaV1()), ndis.UdpEncapType.OTHER, port, entry, len(auth_key), auth_key,
    ).pack()


def test_v1_udpesp_parser_entry_create_reuse_and_all_or_nothing():
    fw = Firmware(Capabilities())
    status, resp = fw.execute(Opcode.V1_ADD_UDPESP_SA, v1_udpesp(0x3001))
    assert status == OK, fw.last_error
    first = ndis.V1_UDPESP_RESPONSE.unpack_exact(resp)
    assert first.encap_type_entry_offld_handle != 0
    # handle 0 again: the existing (type, port) entry is found, not duplicated
    status, resp = fw.execute(Opcode.V1_ADD_UDPESP_SA, v1_udpesp(0x3002))
    assert ndis.V1_UDPESP_RESPONSE.unpack_exact(resp).encap_type_entry_offld_handle == first.encap_type_entry_offld_handle
    # explicit handle: reused
    status, resp = fw.execute(Opcode.V1_ADD_UDPESP_SA, v1_udpesp(0x3003, entry=first.encap_type_entry_offld_handle))
    assert status == OK
    assert fw.stats().parser_entries == 1
    # failure on a new port: neither the SA nor a parser entry stays behind
    status, _ = fw.execute(Opcode.V1_ADD_UDPESP_SA, v1_udpesp(0x3004, port=4501, auth_key=bytes(19)))
    assert status == NdisStatus.INVALID_PARAMETER
    assert fw.stats().parser_entries == 1 and len(fw.sadb) == 3
    # unknown parser handle
    status, _ = fw.execute(Opcode.V1_ADD_UDPESP_SA, v1_udpesp(0x3005, entry=0x4000_7777))
    assert status == NdisStatus.INVALID_PARAMETER and len(fw.sadb) == 3
    # deleting the entry while other SAs use it deletes nothing
    entry = first.encap_type_entry_offld_handle
    del_req = ndis.V1DeleteUdpEspSa(first.offload_handle, entry).pack()
    assert fw.execute(Opcode.V1_DELETE_UDPESP_SA, del_req)[0] == NdisStatus.INVALID_PARAMETER
    assert len(fw.sadb) == 3
    for h in [e.offload_handle for e in list_sas(fw)][1:]:
        assert fw.execute(Opcode.V1_DELETE_UDPESP_SA, ndis.V1DeleteUdpEspSa(h, 0).pack())[0] == OK
    assert fw.execute(Opcode.V1_DELETE_UDPESP_SA, del_req)[0] == OK
    assert len(fw.sadb) == 0 and fw.stats().parser_entries == 0


def test_v1_udpesp_receive_through_parser_entry():
    fw = Firmware(Capabilities())
    assert fw.execute(Opcode.V1_ADD_UDPESP_SA, v1_udpesp(0x3001, auth_key=bytes(range(20))))[0] == OK
    from scapy.layers.ipsec import SecurityAssociation

    sa = SecurityAssociation(ESP, spi=0x3001, crypt_algo="NULL", auth_algo="HMAC-SHA1-96", auth_key=bytes(range(20)),
                             nat_t_header=UDP(sport=4500, dport=4500))
    frame = bytes(Ether() / sa.encrypt(IP(src=A, dst=B) / UDP(sport=1, dport=2) / Raw(b"nat-t")))
    rx = fw.receive(frame)
    assert rx.crypto_done and rx.crypto_status == CryptoStatus.SUCCESS
    # IKE on the same port (non-ESP marker) is left to the host
    ike = bytes(Ether() / IP(src=A, dst=B) / UDP(sport=4500, dport=4500) / Raw(b"\0\0\0\0ike"))
    assert not fw.receive(ike).crypto_done


def test_nat_keepalive_in_a_padded_ethernet_frame_is_not_esp():
    """RFC 3948 §2.3: a NAT-keepalive is one 0xFF byte of UDP payload. On Ethernet it arrives padded to
    the 60-byte minimum frame; the padding after the IP packet must not turn it into an ESP header
    (SPI 0xFF000000 here, which an SA may well use)."""
    fw = Firmware(Capabilities())
    add(fw, 0xFF00_0000, inbound=True, udp=UdpEspEncapsulation.TRANSPORT)
    keepalive = bytes(Ether() / IP(src=A, dst=B) / UDP(sport=4500, dport=4500) / Raw(b"\xff"))
    padded = keepalive + bytes(60 - len(keepalive))
    for frame in (keepalive, padded):
        rx = fw.receive(frame)
        assert (rx.crypto_done, rx.handle, rx.frame) == (False, 0, frame)
    st = fw.stats()
    assert (st.rx_not_processed, st.rx_no_sa) == (2, 0)


def test_v1_add_sa_key_order_is_confidentiality_then_integrity():
    """Datasheet decision 1, checked with scapy as the sender (3DES-CBC + HMAC-SHA1-96)."""
    from device.contract.enums import EncAlg
    from firmware_model.algorithms import ENC_INFO

    if ENC_INFO[EncAlg.TDES_CBC].unavailable:
        pytest.skip(ENC_INFO[EncAlg.TDES_CBC].unavailable)
    from scapy.layers.ipsec import SecurityAssociation

    conf, integ = bytes(range(1, 25)), bytes(range(100, 120))

    def request(key_mat: bytes) -> bytes:
        sa = ndis.SaV1(ndis.V1Operation.ENCRYPT, 0x5001, ndis.AlgoInfoV1(ndis.V1IntegrityAlgo.SHA, 20),
                       ndis.AlgoInfoV1(ndis.V1ConfAlgo.TRIPLE_DES, 24))
        return ndis.V1AddSa(ndis.addr4(A), b"\xff" * 4, ndis.addr4(B), b"\xff" * 4, 0, 0, 0, bytes(4), bytes(4),
                            ndis.V1SaFlags.INBOUND, 1, (sa, ndis.SaV1(), ndis.SaV1()), len(key_mat), key_mat).pack()

    sender = SecurityAssociation(ESP, spi=0x5001, crypt_algo="3DES", crypt_key=conf, auth_algo="HMAC-SHA1-96",
                                 auth_key=integ)
    frame = bytes(Ether() / sender.encrypt(IP(src=A, dst=B) / UDP() / Raw(b"v1 order")))
    right, wrong = Firmware(Capabilities(encryption=frozenset({EncAlg.TDES_CBC}))), None
    assert right.execute(Opcode.V1_ADD_SA, request(conf + integ))[0] == OK, right.last_error
    assert right.receive(frame).crypto_status == CryptoStatus.SUCCESS
    wrong = Firmware(Capabilities(encryption=frozenset({EncAlg.TDES_CBC})))
    wrong.execute(Opcode.V1_ADD_SA, request(integ + conf[:20] + conf[20:]))  # swapped order, same length
    assert wrong.receive(frame).crypto_status == CryptoStatus.TRANSPORT_ESP_AUTH_FAILED


# ---- receive rules -----------------------------------------------------------------------------------


def test_receive_rules_unknown_spi_bad_icv_wrong_destination():
    fw = Firmware(Capabilities())
    h = add(fw, 0x1001, inbound=True)
    good = esp_frame(0x1001)
    rx = fw.receive(good)
    assert (rx.crypto_done, rx.crypto_status, rx.handle) == (True, CryptoStatus.SUCCESS, h)
    inner = Ether(rx.frame)[ESP]  # decrypted in place: ESP header stays, plaintext follows
    assert b"pingping" in bytes(inner)
    unknown = esp_frame(0x9999)
    rx = fw.receive(unknown)
    assert (rx.crypto_done, rx.frame, rx.handle) == (False, unknown, 0)
    bad = bytearray(good)
    bad[-1] ^= 1
    rx = fw.receive(bytes(bad))
    assert rx.crypto_done and rx.crypto_status == CryptoStatus.TRANSPORT_ESP_AUTH_FAILED and rx.frame == bytes(bad)
    elsewhere = esp_frame(0x1001, dst="192.0.2.99")  # SPI matches, destination does not
    assert not fw.receive(elsewhere).crypto_done
    truncated = good[:14 + 20 + 12]
    t = bytearray(truncated)
    struct.pack_into("!H", t, 14 + 2, len(t) - 14)
    t[14 + 10:14 + 12] = b"\0\0"
    rx = fw.receive(bytes(t))
    assert rx.crypto_done and rx.crypto_status == CryptoStatus.INVALID_PACKET_SYNTAX
    st = fw.stats()
    assert (st.rx_crypto_ok, st.rx_auth_failed, st.rx_no_sa, st.rx_syntax_errors) == (1, 1, 2, 1)


def test_tunnel_auth_failure_status():
    fw = Firmware(Capabilities())
    add(fw, 0x1001, inbound=True, udp=UdpEspEncapsulation.TUNNEL)
    sa = scapy_gcm(0x1001, tunnel_header=IP(src=A, dst=B), nat_t_header=UDP(sport=4500, dport=4500))
    frame = bytearray(esp_frame(0x1001, src="10.0.0.1", dst="10.0.0.2", sa=sa))
    frame[-1] ^= 0x40
    rx = fw.receive(bytes(frame))
    assert rx.crypto_status == CryptoStatus.TUNNEL_ESP_AUTH_FAILED


# ---- transmit ----------------------------------------------------------------------------------------


def host_built_gcm_frame(spi: int, seq: int, payload: bytes) -> bytes:
    """What an NDIS host hands the card: ESP header, zeroed IV room, plaintext + trailer, zeroed ICV room."""
    inner = bytes(UDP(sport=7, dport=9) / Raw(payload))
    padlen = -(len(inner) + 2) % 4
    body = struct.pack("!II", spi, seq) + bytes(8) + inner + bytes(range(1, padlen + 1)) + bytes((padlen, 17)) + bytes(16)
    return bytes(Ether() / IP(src=A, dst=B, proto=50) / Raw(body))


def test_crypto_offload_transmit_checked_by_scapy():
    fw = Firmware(Capabilities())
    frame = host_built_gcm_frame(0x1001, 3, b"offloaded")
    assert fw.transmit(frame, 0, False).status == TxOutcome.NO_OFFLOAD
    assert fw.transmit(frame, 0, False).frame == frame
    bad = fw.transmit(frame, 0x80000123, False)
    assert bad.status == TxOutcome.BAD_HANDLE and bad.ndis_status == NdisStatus.FAILURE
    inbound = add(fw, 0x1001, inbound=True)
    assert fw.transmit(frame, inbound, False).status == TxOutcome.BAD_HANDLE  # wrong direction
    h = add(fw, 0x1001, inbound=False)
    res = fw.transmit(frame, h, False)
    assert res.status == TxOutcome.OK
    clear = scapy_gcm(0x1001).decrypt(Ether(res.frame)[IP])
    assert clear[Raw].load == b"offloaded" and clear[UDP].dport == 9


def test_sa_delete_req_marks_pair_and_keeps_both_until_deleted():
    fw = Firmware(Capabilities())
    inbound = add(fw, 0x1001, inbound=True)  # A -> B
    outbound = add(fw, 0x2002, inbound=False, src=B, dst=A)  # B -> A: mirrored endpoints
    rows = {r.offload_handle: r for r in list_sas(fw)}
    assert rows[inbound].paired_handle == outbound and rows[outbound].paired_handle == inbound
    assert not fw.receive(esp_frame(0x1001, seq=5)).sa_delete_req
    rx = fw.receive(esp_frame(0x1001, seq=0xFFFF_FFF0))  # non-ESN counter nearly exhausted
    assert rx.crypto_status == CryptoStatus.SUCCESS and rx.sa_delete_req
    flags = {r.offload_handle: SaListFlags(r.flags) for r in list_sas(fw)}
    assert all(SaListFlags.DELETE_REQUESTED in f for f in flags.values())
    assert fw.receive(esp_frame(0x1001, seq=6)).sa_delete_req  # still served, still asking
    assert fw.execute(Opcode.V1_DELETE_SA, ndis.V1DeleteSa(inbound).pack())[0] == OK
    assert [r.offload_handle for r in list_sas(fw)] == [outbound]
    assert fw.execute(Opcode.V1_DELETE_SA, ndis.V1DeleteSa(outbound).pack())[0] == OK


def packet_sa(spi: int, *, inbound: bool, soft_packets: int = 0, seq: int = 0, window: int = 64) -> bytes:
    e = v2_entry(spi, inbound=inbound)
    size = ndis.ADD_SA_PACKET.size
    key = GCM_KEY + SALT
    return ndis.AddSaPacket(1, e.flags, e.src_addr, e.dest_addr, 0, e.sec_assoc, len(key), size, 0, 0,
                            Mode.TRANSPORT, 0, 0, window, seq, soft_packets=soft_packets, key_data=key).pack()


def test_packet_offload_roundtrip_replay_and_soft_lifetime():
    fw = Firmware(Capabilities())
    status, resp = fw.execute(Opcode.ADD_SA_PACKET, packet_sa(0x7001, inbound=False, seq=41))
    assert status == OK, fw.last_error
    out_handle = ndis.HandleResponse.unpack(resp).offload_handle
    plain = bytes(Ether() / IP(src=A, dst=B) / UDP(sport=5, dport=6) / Raw(b"packet offload"))
    res = fw.transmit(plain, 0, True)  # found by selector (the SA endpoints)
    assert res.status == TxOutcome.OK
    esp = Ether(res.frame)[ESP]
    assert esp.seq == 42  # the card numbers packets: initial_seq + 1
    assert scapy_gcm(0x7001).decrypt(Ether(res.frame)[IP])[Raw].load == b"packet offload"
    assert fw.transmit(plain, out_handle, True).status == TxOutcome.OK
    other = bytes(Ether() / IP(src=A, dst="192.0.2.77") / UDP() / Raw(b"x"))
    assert fw.transmit(other, 0, True).status == TxOutcome.NO_SA

    rx_fw = Firmware(Capabilities())
    assert rx_fw.execute(Opcode.ADD_SA_PACKET, packet_sa(0x7001, inbound=True, soft_packets=2))[0] == OK
    rx = rx_fw.receive(res.frame)
    assert rx.crypto_status == CryptoStatus.SUCCESS and Ether(rx.frame)[Raw].load == b"packet offload"
    assert not rx.sa_delete_req
    replay = rx_fw.receive(res.frame)
    assert replay.crypto_done and replay.crypto_status == CryptoStatus.GENERIC_ERROR and replay.frame == res.frame
    later = rx_fw.receive(fw.transmit(plain, 0, True).frame)
    assert later.crypto_status == CryptoStatus.SUCCESS and later.sa_delete_req  # 2 packets = soft limit


# ---- misc commands -----------------------------------------------------------------------------------


def test_get_caps_stats_and_list_never_leak_keys():
    caps = Capabilities(sa_capacity=77, esn=False)
    fw = Firmware(caps)
    status, resp = fw.execute(Opcode.GET_CAPS, b"")
    wire = ndis.CapsWire.unpack(resp)
    assert status == OK and wire.sa_offload_capacity == 77 and wire.extended_sequence_numbers == 0
    assert wire.encryption_algorithms & EncAlg.AES_GCM_128
    assert not wire.encryption_algorithms & EncAlg.DES_CBC
    # ESN SA refused when the card does not offer ESN
    assert fw.execute(Opcode.V2_ADD_SA_EX, add_sa_ex(0x1001, inbound=True, esn=True))[0] == NdisStatus.NOT_SUPPORTED
    add(fw, 0x1002, inbound=True)
    for opcode, req in ((Opcode.LIST_SAS, ndis.ListSasRequest(0, 10).pack()), (Opcode.GET_STATS, b""),
                        (Opcode.GET_SA_STATS, ndis.HandleRequest(list_sas(fw)[0].offload_handle).pack())):
        status, resp = fw.execute(opcode, req)
        assert status == OK and GCM_KEY not in resp and GCM_KEY[:8] not in resp
    stats = ndis.GlobalStats.unpack(fw.execute(Opcode.GET_STATS, b"")[1])
    assert stats.sa_bundles == 1 and stats.reject_unsupported_feature == 1 and stats.cmd_failed == 1
    assert fw.execute(0x7777, b"")[0] == NdisStatus.INVALID_OID
    assert fw.execute(Opcode.GET_CAPS, b"x")[0] == NdisStatus.INVALID_LENGTH


def test_list_sas_pages():
    fw = Firmware(Capabilities())
    handles = [add(fw, 0x1000 + i, inbound=True) for i in range(5)]
    seen, start = [], 0
    while start != 0xFFFF_FFFF:
        status, resp = fw.execute(Opcode.LIST_SAS, ndis.ListSasRequest(start, 2).pack())
        head, rows = ndis.unpack_list_sas(resp)
        assert status == OK and head.total == 5 and len(rows) <= 2
        seen += [r.offload_handle for r in rows]
        start = head.next_index
    assert seen == handles
    # A page too small for one whole bundle (ESP+AH is two rows) could never advance: refused.
    status, _ = fw.execute(Opcode.LIST_SAS, ndis.ListSasRequest(0, 1).pack())
    assert status == NdisStatus.INVALID_PARAMETER


def test_reset_clears_everything():
    fw = Firmware(Capabilities())
    h = add(fw, 0x1001, inbound=True)
    fw.receive(esp_frame(0x1001))
    fw.reset()
    assert len(fw.sadb) == 0 and fw.stats().rx_packets == 0
    assert fw.execute(Opcode.V1_DELETE_SA, ndis.V1DeleteSa(h).pack())[0] == NdisStatus.INVALID_PARAMETER


def test_ipv6_sa_receive():
    fw = Firmware(Capabilities())
    add(fw, 0x6001, inbound=True, src="2001:db8::1", dst="2001:db8::2")
    rx = fw.receive(esp_frame(0x6001, src="2001:db8::1", dst="2001:db8::2"))
    assert rx.crypto_status == CryptoStatus.SUCCESS and rx.crypto_done
    off = Firmware(Capabilities(ipv6=False))
    status, _ = off.execute(Opcode.V2_ADD_SA_EX, add_sa_ex(0x6001, inbound=True, src="2001:db8::1", dst="2001:db8::2"))
    assert status == NdisStatus.NOT_SUPPORTED


def test_salt_placement_matches_scapy():
    """KeyLength includes the salt, last 4 bytes (datasheet decision 4): a wrong salt fails the ICV."""
    fw = Firmware(Capabilities())
    add(fw, 0x1001, inbound=True, key=GCM_KEY + b"\0\0\0\0")
    assert fw.receive(esp_frame(0x1001)).crypto_status == CryptoStatus.TRANSPORT_ESP_AUTH_FAILED
    fw2 = Firmware(Capabilities())
    add(fw2, 0x1001, inbound=True, key=GCM_KEY + SALT)
    assert fw2.receive(esp_frame(0x1001)).crypto_status == CryptoStatus.SUCCESS


def test_capabilities_from_profile_validates_and_names_the_key():
    from device.contract.enums import EncAlg
    from firmware_model.capabilities import ProfileError

    caps = Capabilities.from_profile({"sa_capacity": 1_000_000, "encryption": ["aes-gcm-256"], "udp_esp": ["tunnel"],
                                      "esn": False})
    assert caps.sa_capacity == 1_000_000 and caps.encryption == frozenset({EncAlg.AES_GCM_256})
    assert caps.udp_esp == UdpEspEncapsulation.TUNNEL and not caps.esn
    for bad, where in (({"sa_capacity": 0}, "firmware.sa_capacity"), ({"encryption": ["des-cbc"]}, "refused"),
                       ({"integrity": ["hmac-sha512"]}, "firmware.integrity: unknown algorithm"),
                       ({"esn": "yes"}, "firmware.esn"), ({"capacity": 5}, "firmware.capacity: unknown key"),
                       ({"udp_esp": ["sideways"]}, "firmware.udp_esp")):
        with pytest.raises(ProfileError, match=where):
            Capabilities.from_profile(bad)


def test_guest_side_modules_import_without_the_engine():
    """The contract package is imported by guest tools on the guest's python3: stdlib only."""
    import subprocess
    import sys

    code = "import sys, device.contract.sa, device.contract.sa_file; bad = [m for m in ('cryptography', 'yaml', 'scapy') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_esp_then_ah_bundle_reports_which_layer_failed():
    """NDIS distinguishes AH from ESP ICV failures. In an ESP-then-AH bundle the outer AH can verify
    while the inner ESP fails (here: the sender used another ESP integrity key); a flipped byte fails AH first."""
    from dataclasses import replace

    from device.contract.enums import AuthAlg, Direction, EncAlg, IpProto, Mode
    from device.contract.sa import SaParams
    from firmware_model.engine import SaBundle

    esp = SaParams(spi=0x2001, proto=IpProto.ESP, direction=Direction.INBOUND, mode=Mode.TRANSPORT, src=A, dst=B,
                   enc_alg=EncAlg.AES_CBC_128, enc_key=bytes(range(16)),
                   auth_alg=AuthAlg.SHA256, auth_key=bytes(range(32)), icv_len=16)
    ah = SaParams(spi=0x2002, proto=IpProto.AH, direction=Direction.INBOUND, mode=Mode.TRANSPORT, src=A, dst=B,
                  auth_alg=AuthAlg.SHA1, auth_key=bytes(range(20)), icv_len=12)
    fw = Firmware(Capabilities())
    fw.add_sa([esp, ah])

    def sent_by(esp_auth_key: bytes) -> bytes:
        out = SaBundle(replace(esp, direction=Direction.OUTBOUND, auth_key=esp_auth_key),
                       replace(ah, direction=Direction.OUTBOUND))
        verdict, packet = out.encapsulate(bytes(IP(src=A, dst=B) / UDP(sport=1, dport=2) / Raw(b"bundle")))
        assert verdict == 0
        return bytes(Ether(dst="02:00:00:00:00:02") / IP(packet))

    good = fw.receive(sent_by(bytes(range(32))))
    assert good.crypto_done and good.crypto_status == CryptoStatus.SUCCESS
    wrong_esp_key = fw.receive(sent_by(bytes(32)))
    assert wrong_esp_key.crypto_status == CryptoStatus.TRANSPORT_ESP_AUTH_FAILED
    tampered = bytearray(sent_by(bytes(range(32))))
    tampered[-1] ^= 1
    assert fw.receive(bytes(tampered)).crypto_status == CryptoStatus.TRANSPORT_AH_AUTH_FAILED


def test_ipv6_chain_of_eight_extension_headers_is_walked():
    """Datasheet §7.5: only IPv6 with *more than* 8 extension headers goes unprocessed."""
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt

    def frame(n: int) -> bytes:
        pkt = IPv6(src="2001:db8::1", dst="2001:db8::2")
        for _ in range(n):
            pkt = pkt / IPv6ExtHdrDestOpt()
        return bytes(Ether() / pkt / ESP(spi=0x1234, seq=1) / Raw(bytes(32)))

    fw = Firmware(Capabilities())
    for n in (1, 8):
        fw.receive(frame(n))
    assert (fw.stats().rx_no_sa, fw.stats().rx_not_processed) == (2, 0)
    fw.receive(frame(9))
    assert (fw.stats().rx_no_sa, fw.stats().rx_not_processed) == (2, 1)
