"""Command wire formats: layout/dataclass agreement, round trips, malformed payloads, fuzzing."""

from __future__ import annotations

import contextlib
import dataclasses
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device.contract import ndis
from device.contract.ndis import NdisStatus, Opcode, ParseError
from device.contract.status import CryptoStatus
from firmware_model.capabilities import Capabilities
from firmware_model.firmware import Firmware

from .fw_builders import add_sa_ex, v2_entry


def test_every_layout_bound_and_fields_match_dataclass():
    for name, layout in ndis.LAYOUTS.items():
        assert layout.cls is not None, name
        names = [f.name for f in dataclasses.fields(layout.cls)][: len(layout.value_names)]
        assert tuple(names) == layout.value_names
        assert layout.size == sum(size for _, size, *_ in layout.rows())
        # fields are laid out back to back: each row starts where the previous ended
        rows = layout.rows()
        assert all(a[0] + a[1] == b[0] for a, b in zip(rows, rows[1:], strict=False))


def test_markdown_tables_list_every_field():
    text = ndis.markdown_tables()
    for layout in ndis.LAYOUTS.values():
        assert f"**{layout.name}**" in text
        for f in layout.fields:
            assert f"| {f.name} |" in text


def test_u64_fields_are_naturally_aligned():
    """DMA-friendly layouts: every u64 at a multiple of 8, every u32 at a multiple of 4."""
    for layout in ndis.LAYOUTS.values():
        for offset, size, name, typ, _ in layout.rows():
            if typ in ("u64", "u32"):
                assert offset % size == 0, f"{layout.name}.{name} at {offset}"


def test_v2_object_header_checked():
    raw = bytearray(add_sa_ex(0x1001, inbound=True))
    assert ndis.V2AddSaEx.unpack(bytes(raw)).sec_assoc[0].spi == 0x1001
    for offset, value in ((0, 0x81), (1, 2)):
        bad = bytearray(raw)
        bad[offset] = value
        with pytest.raises(ParseError):
            ndis.V2AddSaEx.unpack(bytes(bad))
    bad = bytearray(raw)
    struct.pack_into("<H", bad, 2, ndis.V2_ADD_SA_EX.size + 4)
    with pytest.raises(ParseError, match="header_size"):
        ndis.V2AddSaEx.unpack(bytes(bad))


def test_v2_add_list_round_trip_and_next_offset():
    entries = [v2_entry(0x1001, inbound=True), v2_entry(0x1002, inbound=False, key=bytes(range(36)))]
    raw = ndis.pack_v2_add_sa_list(entries)
    first = ndis.V2_ADD_SA.unpack_from(raw)
    assert first.next_offset == ndis.V2_ADD_SA.size + 20  # 20 key bytes, already 4-aligned
    back = ndis.unpack_v2_add_sa_list(raw)
    assert [e.key_data for e in back] == [e.key_data for e in entries]
    assert [e.sec_assoc for e in back] == [e.sec_assoc for e in entries]
    # a next_offset pointing into the entry itself is refused (lists only move forward)
    bad = bytearray(raw)
    struct.pack_into("<I", bad, 4, 8)
    with pytest.raises(ParseError):
        ndis.unpack_v2_add_sa_list(bytes(bad))


def test_delete_list_round_trip():
    raw = ndis.pack_v2_delete_sa_list([0x80000001, 0x80100002])
    assert ndis.unpack_v2_delete_sa_list(raw) == [0x80000001, 0x80100002]
    with pytest.raises(ParseError):
        ndis.unpack_v2_delete_sa_list(raw + b"\0")


def test_v1_key_tail_must_match_key_len():
    sa = ndis.SaV1(ndis.V1Operation.ENCRYPT, 0x1234, ndis.AlgoInfoV1(2, 20), ndis.AlgoInfoV1(0, 0))
    req = ndis.V1AddSa(bytes(4), bytes(4), bytes(4), bytes(4), 0, 0, 0, bytes(4), bytes(4), 1, 1,
                       (sa, ndis.SaV1(), ndis.SaV1()), 20, bytes(20))
    raw = req.pack()
    assert ndis.V1AddSa.unpack(raw) == req
    with pytest.raises(ParseError) as exc:
        ndis.V1AddSa.unpack(raw[:-1])
    assert exc.value.status == NdisStatus.INVALID_LENGTH


def test_caps_round_trip():
    caps = Capabilities(sa_capacity=4096, max_replay_window=1024)
    wire = ndis.CapsWire.unpack(caps.pack())
    assert wire == caps.to_wire()
    assert wire.tunnel == 1 and wire.encapsulation == ndis.NDIS_ENCAPSULATION_IEEE_802_3


def test_status_values_are_the_ndis_ones():
    # NDIS 6 ndis.h: NDIS_STATUS_INVALID_PARAMETER = STATUS_INVALID_PARAMETER (ntstatus.h 0xC000000D);
    # FreeBSD sys/compat/ndis/ndis_var.h lists the others numerically.
    assert NdisStatus.INVALID_PARAMETER == 0xC000000D
    assert NdisStatus.RESOURCES == 0xC000009A and NdisStatus.NOT_SUPPORTED == 0xC00000BB
    assert NdisStatus.FAILURE == 0xC0000001 and NdisStatus.INVALID_LENGTH == 0xC0010014
    # the NDIS enum is 0..7; the card's own values (RX descriptor) start at 0x100
    assert [s.value for s in CryptoStatus if s < 0x100] == list(range(8)) and CryptoStatus.REPLAY == 0x100


_FIXED_PARSERS = [layout.unpack_exact for layout in ndis.LAYOUTS.values()]
_VARIABLE_PARSERS = [
    ndis.V1AddSa.unpack, ndis.V1AddUdpEspSa.unpack, ndis.V2AddSaEx.unpack, ndis.AddSaPacket.unpack,
    ndis.unpack_v2_add_sa_list, ndis.unpack_v2_delete_sa_list, ndis.unpack_list_sas, ndis.unpack_sa_stats,
    lambda b: ndis.unpack_counted(b, ndis.V2_ADD_SA_RESULT),
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=700))
def test_random_bytes_raise_only_parse_error(data):
    for parse in _FIXED_PARSERS + _VARIABLE_PARSERS:
        with contextlib.suppress(ParseError):
            parse(data)


_VALID = [
    ndis.pack_v2_add_sa_list([v2_entry(0x1001, inbound=True), v2_entry(0x1002, inbound=False)]),
    add_sa_ex(0x1003, inbound=True, esn=True),
    ndis.pack_v2_delete_sa_list([0x80000000, 0x80000001]),
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_VALID), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6))
def test_mutated_valid_requests_raise_only_parse_error(raw, flips):
    data = bytearray(raw)
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    for parse in _VARIABLE_PARSERS:
        with contextlib.suppress(ParseError):
            parse(bytes(data))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(list(Opcode) + [0, 0xFFFF]), st.binary(max_size=400))
def test_execute_never_raises_and_internal_errors_do_not_happen(opcode, data):
    fw = Firmware(Capabilities(sa_capacity=8))
    status, resp = fw.execute(opcode, data)
    assert isinstance(status, int) and isinstance(resp, bytes)
    assert not fw.last_error.startswith("internal error"), fw.last_error


_COMMANDS = [
    (Opcode.V2_ADD_SA, _VALID[0]),
    (Opcode.V2_ADD_SA_EX, _VALID[1]),
    (Opcode.V2_DELETE_SA, _VALID[2]),
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_COMMANDS), st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), max_size=4))
def test_execute_mutated_commands_never_hit_internal_errors(command, flips):
    opcode, raw = command
    data = bytearray(raw)
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    fw = Firmware(Capabilities(sa_capacity=8))
    status, _ = fw.execute(opcode, bytes(data))
    assert not fw.last_error.startswith("internal error"), fw.last_error
    if status != NdisStatus.SUCCESS and opcode != Opcode.V2_DELETE_SA:
        assert len(fw.sadb) == 0  # a failed add leaves nothing behind


def test_key_bytes_never_in_request_reprs():
    """Requests carry key material (key_mat / key_data): a repr in a log, a traceback or a pytest
    failure message must not show it."""
    secret = bytes.fromhex("deadbeefcafef00d" * 3)
    v1 = ndis.V1AddSa(*(bytes(4),) * 4, 0, 0, 0, bytes(4), bytes(4), 2, 1, (ndis.SaV1(),) * 3, len(secret),
                      key_mat=secret)
    requests = [
        ndis.V2AddSaEx.unpack(add_sa_ex(0x1001, inbound=False, key=secret[:20])),
        *ndis.unpack_v2_add_sa_list(ndis.pack_v2_add_sa_list([v2_entry(0x1001, inbound=False, key=secret[:20])])),
        ndis.V1AddSa.unpack(v1.pack()),
    ]
    for r in requests:
        assert secret[:20] in (r.key_mat if isinstance(r, ndis.V1AddSa) else r.key_data)
        text = repr(r)
        assert "deadbeef" not in text and "\\xde\\xad" not in text, type(r).__name__


def test_algorithm_identifiers_are_the_wdk_values():
    """One enum per algorithm family serves as NDIS identifier, capability bit and SaParams field; its values
    are the WDK's IPSEC_OFFLOAD_V2_ENCRYPTION_* / _AUTHENTICATION_* (ndis.h), where AES_GCM_* authentication
    means AES-GMAC."""
    from device.contract.enums import AuthAlg, EncAlg, Mode

    wdk_enc = {"NONE": 0x1, "DES_CBC": 0x2, "TDES_CBC": 0x4, "AES_GCM_128": 0x8, "AES_GCM_192": 0x10,
               "AES_GCM_256": 0x20, "AES_CBC_128": 0x40, "AES_CBC_192": 0x80, "AES_CBC_256": 0x100}
    wdk_auth = {"NONE": 0x0, "MD5": 0x1, "SHA_1": 0x2, "SHA_256": 0x4, "AES_GCM_128": 0x8, "AES_GCM_192": 0x10,
                "AES_GCM_256": 0x20}
    # (__members__: iterating an IntFlag skips its zero member)
    assert {n: int(m) for n, m in EncAlg.__members__.items()} == wdk_enc
    assert sorted(map(int, AuthAlg.__members__.values())) == sorted(wdk_auth.values())
    assert {m.name: int(m) for m in Mode} == {"TRANSPORT": 0, "TUNNEL": 1}
