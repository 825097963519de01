"""The engine's straight-line IPv4 AES-GCM fast paths must behave exactly like its general code:
same verdicts, bytes, in-place frames, counters, sequence numbers and replay windows, on random and
mutated traffic (see fastpath_diff.py; run it directly for longer runs)."""

from __future__ import annotations

import random
import struct

import pytest

from device.contract.enums import Direction, IpProto, Mode
from device.contract.sa import SaParams
from firmware_model import fastpath
from firmware_model.engine import SaEngine

from .fastpath_diff import ALGS, compare, ipv4, state, twins


@pytest.mark.parametrize("seed", [1, 2])
def test_fast_and_general_paths_agree(seed):
    checked, seen = compare(2000, seed)
    assert checked == 2000 // 500 * 500 * 4
    # The mutations reach the interesting outcomes, so the agreement means something.
    for outcome in [("encap", "OK"), ("decap", "OK"), ("decap", "AUTH_FAILED"), ("decap", "REPLAY"),
                    ("decap", "BAD_SYNTAX"), ("crypto_encrypt", "OK"), ("crypto_decrypt", "OK"),
                    ("crypto_decrypt", "AUTH_FAILED")]:
        assert seen[outcome] > 0, f"no {outcome} in {dict(seen)}"


def _rfc1071_ok(hdr: bytes) -> bool:
    """A header whose checksum is right sums to 0xFFFF in ones' complement (RFC 1071), computed from
    scratch word by word -- not the fast path's merged-field arithmetic."""
    s = sum(struct.unpack(f"!{len(hdr) // 2}H", hdr))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s == 0xFFFF


_EXTREMES = [(0, 0, 1, b"\0\0\0\0", b"\0\0\0\0"), (0xFF, 0xFFFF, 0xFF, b"\xff" * 4, b"\xff" * 4),
             (0x00, 0x0000, 0x01, b"\xff\xff\x00\x00", b"\x00\x00\xff\xff"), (0xB8, 0xFFFE, 0x80, b"\x0a\0\0\1", b"\x0a\0\0\2")]


@pytest.mark.parametrize("seed", [3, 4])
def test_fast_header_checksums_fields_and_round_trip(seed, monkeypatch):
    """TOS, ID, DF, TTL and addresses of every value reach the output unchanged with a checksum that is
    right from scratch, both ways; the fast engine's output equals its general twin's. All of these take
    the straightest fast paths (no call of the checked variants)."""
    checked = []
    for name in ("_encapsulate_v4_checked", "_decapsulate_v4_checked"):
        real = getattr(fastpath, name)
        monkeypatch.setattr(fastpath, name, lambda *a, real=real: checked.append(a[0]) or real(*a))
    rng = random.Random(seed)
    kw = dict(spi=0xABCD_EF01, proto=IpProto.ESP, mode=Mode.TRANSPORT, src="10.0.0.1", dst="10.0.0.2", **ALGS[0])
    tx, tx_ref = twins(SaParams(direction=Direction.OUTBOUND, **kw))
    rx, rx_ref = twins(SaParams(direction=Direction.INBOUND, **kw))
    cases = _EXTREMES + [(rng.randrange(256), rng.randrange(65536), rng.randrange(1, 256), rng.randbytes(4),
                          rng.randbytes(4)) for _ in range(300)]
    for tos, ident, ttl, src, dst in cases:
        payload = rng.randbytes(rng.choice((0, 1, 2, 3, 40, 1380)))
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(payload), ident, rng.choice((0, 0x4000)), ttl,
                          rng.choice((6, 17, 1)), 0, src, dst)
        pkt = hdr[:10] + struct.pack("!H", ~_fold(hdr) & 0xFFFF) + hdr[12:] + payload
        verdict, wire = tx.encapsulate(pkt)
        assert (verdict, wire) == tx_ref.encapsulate(pkt) and state(tx) == state(tx_ref)
        assert verdict.name == "OK" and _rfc1071_ok(wire[:20])
        assert wire[1] == tos and wire[4:8] == pkt[4:8] and wire[8] == ttl and wire[9] == 50 and wire[12:20] == src + dst
        assert struct.unpack("!II", wire[20:28]) == (0xABCD_EF01, tx._seq)
        verdict, back = rx.decapsulate(wire)
        assert (verdict, back) == rx_ref.decapsulate(wire) and state(rx) == state(rx_ref)
        assert back == pkt and _rfc1071_ok(back[:20])
    assert tx not in checked and rx not in checked  # (the reference twins go through them)


def _fold(hdr: bytes) -> int:
    s = sum(struct.unpack("!10H", hdr))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


@pytest.mark.parametrize("window", [0, 64])
def test_fast_paths_across_the_sequence_limits(window):
    """The fast encapsulation stops one number before the near-exhaustion warning; the checked path takes
    over up to 2^32 - 1 and then refuses (RFC 4303 §3.3.3) -- exactly as the general code. Receive takes
    the same numbers, in order and replayed."""
    kw = dict(spi=0x4242, proto=IpProto.ESP, mode=Mode.TRANSPORT, src="10.0.0.1", dst="10.0.0.2",
              replay_window=window, **ALGS[0])
    probe = SaEngine(SaParams(direction=Direction.OUTBOUND, **kw))
    start = probe._seq_warn - 3
    tx, tx_ref = twins(SaParams(direction=Direction.OUTBOUND, seq=start, **kw))
    rx, rx_ref = twins(SaParams(direction=Direction.INBOUND, **kw))
    rng = random.Random(window)
    outcomes = []
    wires = []
    while tx._seq < 0xFFFF_FFFF or len(outcomes) < 0xFFFF_FFFF - start + 2:
        if tx._seq == tx._seq_warn + 2:  # skip most of the warning zone
            tx._seq = tx_ref._seq = tx._iv_last = tx_ref._iv_last = 0xFFFF_FFFD
        pkt = ipv4(rng, 30)
        a = tx.encapsulate(pkt)
        assert a == tx_ref.encapsulate(pkt) and state(tx) == state(tx_ref)
        outcomes.append((a[0].name, tx.seq_nearly_exhausted))
        if a[1]:
            wires.append(a[1])
        for wire in [a[1]] if a[1] else []:
            b = rx.decapsulate(wire)
            assert b == rx_ref.decapsulate(wire) and state(rx) == state(rx_ref)
            assert b[1][:10] + b[1][12:] == pkt[:10] + pkt[12:] and _rfc1071_ok(b[1][:20])  # checksum made anew
        if len(outcomes) > 20:
            break
    assert ("OK", False) in outcomes and ("OK", True) in outcomes and outcomes[-1] == ("SEQ_OVERFLOW", True)
    for wire in wires[:3] + wires[-2:]:  # replays: refused with a window, let through without one
        b = rx.decapsulate(wire)
        assert b == rx_ref.decapsulate(wire) and state(rx) == state(rx_ref)
        assert b[0].name == ("REPLAY" if window else "OK")
