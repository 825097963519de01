"""SA database: handles, lookups, validate-then-commit, capacity, pairing, selectors, scale."""

from __future__ import annotations

import os
import resource
import time
from dataclasses import replace

import pytest

from device.contract.enums import AuthAlg, Direction, EncAlg, IpProto, Mode
from device.contract.ndis import RejectReason
from device.contract.sa import SaParams
from device.contract.status import NdisStatus
from firmware_model.capabilities import Capabilities
from firmware_model.sadb import SLOT_MASK, VALID, Sadb, SaRejected, Selector

KEY = bytes(range(20))
BASE = SaParams(spi=0x1000, proto=IpProto.ESP, direction=Direction.INBOUND, mode=Mode.TRANSPORT,
                src="10.0.0.1", dst="10.0.0.2", enc_alg=EncAlg.AES_GCM_128, enc_key=KEY)


def sa(**kw) -> SaParams:
    return replace(BASE, **kw)


def test_handles_are_never_zero_and_detect_staleness():
    db = Sadb(Capabilities(sa_capacity=4))
    e = db.add([sa()])
    assert e.handle & VALID and e.handle != 0
    assert db.get(e.handle) is e and db.get(0) is None and db.get(e.handle & ~VALID) is None
    old = e.handle
    db.remove(old)
    again = db.add([sa()])
    assert again.handle & SLOT_MASK == old & SLOT_MASK and again.handle != old
    assert db.get(old) is None and db.get(again.handle) is again


def test_generation_wraps_without_handing_out_zero():
    db = Sadb(Capabilities(sa_capacity=1))
    seen = set()
    for _ in range(2100):  # more than 2^11 generations of the same slot
        e = db.add([sa()])
        assert e.handle != 0
        seen.add(e.handle)
        db.remove(e.handle)
    assert len(seen) == 2048  # every generation value used once before wrapping


def test_inbound_lookup_by_spi_destination_protocol():
    db = Sadb(Capabilities())
    e = db.add([sa()])
    wild = db.add([sa(spi=0x2000, dst="0.0.0.0")])
    dst = bytes([10, 0, 0, 2])
    assert db.lookup_inbound(0x1000, dst, 50) == (e, 0)
    assert db.lookup_inbound(0x1000, bytes([10, 0, 0, 3]), 50) is None
    assert db.lookup_inbound(0x1000, dst, 51) is None
    assert db.lookup_inbound(0x2000, bytes([1, 2, 3, 4]), 50) == (wild, 0)  # wildcard destination
    db.remove(e.handle)
    assert db.lookup_inbound(0x1000, dst, 50) is None


def test_inbound_spi_shared_by_several_destinations():
    """RFC 4301 §4.1: an SPI is unique per destination, so one SPI may name several SAs; the exact
    destination wins over a wildcard one, and removing SAs in any order keeps the others found."""
    db = Sadb(Capabilities())
    a, b = bytes([10, 0, 0, 2]), bytes([10, 0, 0, 3])
    ea = db.add([sa()])
    wild = db.add([sa(dst="0.0.0.0")])
    eb = db.add([sa(dst="10.0.0.3")])
    ah = sa(proto=IpProto.AH, enc_alg=EncAlg.NONE, enc_key=b"", auth_alg=AuthAlg.SHA1, auth_key=bytes(20), icv_len=12)
    bundle = db.add([sa(dst="10.0.0.4"), replace(ah, dst="10.0.0.4")])
    ah_only = db.add([ah])
    assert db.lookup_inbound(0x1000, a, 50) == (ea, 0) and db.lookup_inbound(0x1000, b, 50) == (eb, 0)
    assert db.lookup_inbound(0x1000, bytes([10, 0, 0, 9]), 50) == (wild, 0)
    assert db.lookup_inbound(0x1000, bytes([10, 0, 0, 4]), 51) == (bundle, 1)
    assert db.lookup_inbound(0x1000, a, 51) == (ah_only, 0)
    assert db.lookup_inbound(0x1000, bytes([10, 0, 0, 9]), 51) is None  # no wildcard AH SA
    with pytest.raises(SaRejected) as exc:
        db.add([sa(dst="10.0.0.3")])
    assert exc.value.reason == RejectReason.DUPLICATE_SPI
    db.remove(wild.handle)
    assert db.lookup_inbound(0x1000, bytes([10, 0, 0, 9]), 50) is None
    assert db.lookup_inbound(0x1000, a, 50) == (ea, 0)
    for gone in (ea, eb, bundle):
        db.remove(gone.handle)
    assert db.lookup_inbound(0x1000, a, 50) is None and db.lookup_inbound(0x1000, b, 50) is None
    assert db.lookup_inbound(0x1000, a, 51) == (ah_only, 0)
    again = db.add([sa()])  # the SPI is free again for 10.0.0.2
    assert db.lookup_inbound(0x1000, a, 50) == (again, 0)
    assert db.lookup_inbound(0x1000, a, 6) is None  # neither ESP nor AH


def test_rejects_are_counted_and_nothing_is_stored():
    db = Sadb(Capabilities(sa_capacity=1, integrity=frozenset({AuthAlg.SHA256})))
    cases = [
        ([sa(spi=0x10)], RejectReason.BAD_SPI, NdisStatus.INVALID_PARAMETER),
        ([sa(enc_key=KEY[:16])], RejectReason.BAD_KEY, NdisStatus.INVALID_PARAMETER),
        ([sa(icv_len=10)], RejectReason.BAD_ICV_LENGTH, NdisStatus.INVALID_PARAMETER),
        ([sa(enc_alg=EncAlg.DES_CBC, enc_key=bytes(8))], RejectReason.UNSUPPORTED_ALGORITHM, NdisStatus.NOT_SUPPORTED),
        ([sa(enc_alg=EncAlg.AES_CBC_128, enc_key=bytes(16), auth_alg=AuthAlg.SHA1, auth_key=bytes(20), icv_len=12)],
         RejectReason.UNSUPPORTED_ALGORITHM, NdisStatus.NOT_SUPPORTED),  # SHA1 not enabled on this card
        ([sa(enc_alg=EncAlg.AES_CBC_128, enc_key=bytes(16))], RejectReason.UNSUPPORTED_ALGORITHM,
         NdisStatus.NOT_SUPPORTED),  # CBC without integrity (datasheet decision 6)
        ([sa(src="10.0.0.1", dst="2001:db8::1")], RejectReason.BAD_ADDRESS, NdisStatus.INVALID_PARAMETER),
        ([sa(proto=IpProto.AH, enc_alg=EncAlg.NONE, enc_key=b"", auth_alg=AuthAlg.SHA256, auth_key=bytes(32)),
          sa()], RejectReason.BAD_BUNDLE, NdisStatus.INVALID_PARAMETER),  # AH then ESP: wrong order
    ]
    for params, reason, status in cases:
        with pytest.raises(SaRejected) as exc:
            db.add(params)
        assert (exc.value.reason, exc.value.status) == (reason, status), params
    assert len(db) == 0
    db.add([sa()])
    with pytest.raises(SaRejected) as exc:
        db.add([sa()])  # same SPI/dst/proto while full: duplicate is found first
    assert exc.value.reason == RejectReason.DUPLICATE_SPI
    with pytest.raises(SaRejected) as exc:
        db.add([sa(spi=0x1001)])
    assert exc.value.status == NdisStatus.RESOURCES
    assert db.rejects[RejectReason.UNSUPPORTED_ALGORITHM] == 3 and db.rejects[RejectReason.CAPACITY] == 1


def test_esp_ah_bundle_counts_once_against_capacity():
    db = Sadb(Capabilities(sa_capacity=1))
    ah = sa(proto=IpProto.AH, enc_alg=EncAlg.NONE, enc_key=b"", auth_alg=AuthAlg.SHA1, auth_key=bytes(20), icv_len=12)
    e = db.add([sa(), ah])
    assert len(db) == 1
    assert db.lookup_inbound(0x1000, bytes([10, 0, 0, 2]), 51) == (e, 1)
    assert db.lookup_inbound(0x1000, bytes([10, 0, 0, 2]), 50) == (e, 0)


def test_pairing_mirrored_endpoints_and_delete_request():
    db = Sadb(Capabilities())
    inbound = db.add([sa()])
    unrelated = db.add([sa(spi=0x3000, direction=Direction.OUTBOUND, src="10.0.0.9", dst="10.0.0.1")])
    outbound = db.add([sa(spi=0x2000, direction=Direction.OUTBOUND, src="10.0.0.2", dst="10.0.0.1")])
    assert inbound.paired is outbound and outbound.paired is inbound and unrelated.paired is None
    db.request_delete(inbound)
    assert inbound.delete_requested and outbound.delete_requested and not unrelated.delete_requested
    db.remove(inbound.handle)
    assert outbound.paired is None and db.get(outbound.handle) is outbound


def test_selector_lookup_prefers_longer_prefixes():
    db = Sadb(Capabilities())
    out = dict(direction=Direction.OUTBOUND, mode=Mode.TUNNEL, src="198.51.100.1", dst="198.51.100.2")
    broad = db.add([sa(spi=0x4000, **out)], packet_offload=True, selector=Selector.from_text("10.0.0.0/8", "0.0.0.0/0"))
    narrow = db.add([sa(spi=0x4001, **out)], packet_offload=True,
                    selector=Selector.from_text("10.1.0.0/16", "192.0.2.0/24", proto=17))
    ip = lambda s: int.from_bytes(bytes(map(int, s.split("."))), "big")  # noqa: E731
    assert db.lookup_selector(4, ip("10.1.2.3"), ip("192.0.2.9"), 17, 1, 2) is narrow
    assert db.lookup_selector(4, ip("10.1.2.3"), ip("192.0.2.9"), 6, 1, 2) is broad  # proto mismatch
    assert db.lookup_selector(4, ip("11.1.2.3"), ip("192.0.2.9"), 17, 1, 2) is None
    db.remove(narrow.handle)
    assert db.lookup_selector(4, ip("10.1.2.3"), ip("192.0.2.9"), 17, 1, 2) is broad


def test_engines_are_built_lazily():
    db = Sadb(Capabilities())
    e = db.add([sa()])
    assert e.built_engines() == []
    assert e.runtime() is e.runtime()
    assert len(e.built_engines()) == 1


def test_scale_adds_and_lookups():
    """100k bundles (1,000,000 with IPSEC_NIC_SADB_1M=1): measures add rate, lookup rate and memory."""
    n = 1_000_000 if os.environ.get("IPSEC_NIC_SADB_1M") else 100_000
    db = Sadb(Capabilities(sa_capacity=n))
    params = [sa(spi=0x100 + i) for i in range(n)]
    t0 = time.perf_counter()
    for p in params:
        db.add([p])
    t_add = time.perf_counter() - t0
    dst = bytes([10, 0, 0, 2])
    t0 = time.perf_counter()
    for i in range(0, n, 3):
        assert db.lookup_inbound(0x100 + i, dst, 50)[0].params[0].spi == 0x100 + i
    t_lookup = time.perf_counter() - t0
    with pytest.raises(SaRejected):
        db.add([sa(spi=0x100 + n)])
    assert len(db) == n
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n{n} SAs: add {n / t_add:.0f}/s, lookup {(n // 3) / t_lookup:.0f}/s, max RSS {rss:.0f} MiB")
