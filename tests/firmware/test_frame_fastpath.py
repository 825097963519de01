"""Firmware.transmit / receive's whole-frame fast paths (firmware_model/framepath.py) against the general
code: two cards with the same SAs get the same frames -- one with the fast paths, one whose transmit /
receive are TrafficPath's and whose engines have their own fast paths switched off -- and every result
(frame bytes and type, status, flags, handles, trailer), global counter, per-SA engine state and
SaDeleteReq flag must agree. The SA shapes and frames include the ones that must fall back: IP options,
fragments, VLAN tags, IPv6, wrong SPI/destination, forged ICVs, replays, bad padding, dummy packets,
UDP encapsulation, lifetimes, ESN, tunnel mode, AES-CBC, truncated tags, traffic filters."""

from __future__ import annotations

import random
import struct
from collections import Counter
from dataclasses import astuple, fields

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device.contract.enums import AuthAlg, Direction, EncAlg, IpProto, Mode
from device.contract.sa import SaParams, UdpEncap
from firmware_model.capabilities import Capabilities
from firmware_model.firmware import Firmware
from firmware_model.traffic import TrafficPath
from firmware_model.traffic_filter import TrafficFilter

from .fastpath_diff import same_iv_generator, state

ETH = bytes.fromhex("020000000002" "020000000001" "0800")
VLAN_ETH = bytes.fromhex("020000000002" "020000000001" "8100" "0005" "0800")
A, B = "10.0.0.1", "10.0.0.2"
GCM_KEY = bytes(range(16)) + b"salt"


class GeneralFirmware(Firmware):
    """The reference: TrafficPath's per-frame code, engines without their fast paths."""

    transmit = TrafficPath.transmit
    receive = TrafficPath.receive


def checksum(hdr: bytes) -> bytes:
    s = sum(struct.unpack(f"!{len(hdr) // 2}H", hdr))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return struct.pack("!H", ~s & 0xFFFF)


def ipv4(rng: random.Random, payload: bytes, proto: int, *, options: bytes = b"", frag: int = 0) -> bytes:
    hl = 20 + len(options)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | hl // 4, rng.randrange(256), hl + len(payload), rng.randrange(65536),
                      frag or rng.choice((0, 0x4000)), rng.randrange(1, 256), proto, 0, bytes([10, 0, 0, 1]),
                      bytes([10, 0, 0, 2])) + options
    return hdr[:10] + checksum(hdr) + hdr[12:] + payload


def ipv6(rng: random.Random, payload: bytes, nh: int) -> bytes:
    return struct.pack("!IHBB16s16s", 0x6000_0000, len(payload), nh, 64, bytes(15) + b"\1", bytes(15) + b"\2") + payload


def host_built_esp(rng: random.Random, spi: int, seq: int, icv: int = 16) -> bytes:
    """Crypto offload: the host's ESP framing (header, IV room, payload, RFC 4303 trailer, ICV room)."""
    inner = rng.randbytes(rng.choice((0, 1, 6, 30, 200, 1380)))
    padlen = -(len(inner) + 2) % 4
    pad = bytes(range(1, padlen + 1)) if rng.random() < 0.9 else bytes(padlen)
    nh = rng.choice((17, 17, 6, 59, 4))
    return struct.pack("!II", spi, seq) + bytes(8) + inner + pad + bytes((padlen, nh)) + bytes(icv)


def mutate(rng: random.Random, frame: bytes) -> bytes:
    b = bytearray(frame)
    what = rng.randrange(10)
    if what == 0:
        del b[rng.randrange(14, len(b)):]  # truncated
    elif what == 1:
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)  # a bit anywhere: ICV, padding, SPI, header
    elif what == 2:
        b[14 + 6] |= rng.choice((0x20, 0x01))  # a fragment
    elif what == 3:
        b[14 + 9] = rng.choice((17, 51, 6))  # another protocol
    elif what == 4:
        b += rng.randbytes(rng.randrange(1, 9))  # link-layer padding
    elif what == 5:
        b[12:14] = rng.choice((b"\x86\xdd", b"\x81\x00", b"\x08\x06"))  # another ethertype
    elif what == 6:
        b[34:38] = struct.pack("!I", rng.choice((0x999, 0)))  # another SPI
    elif what == 7:
        b[30:34] = bytes([10, 0, 0, 9])  # another destination
    elif what == 8:
        b[38:42] = struct.pack("!I", rng.choice((0, 1, 0xFFFF_FFF0)))  # sequence number
    else:
        b[16:18] = struct.pack("!H", rng.randrange(20, 70000) & 0xFFFF)  # total length
    return bytes(b)


def sa_kwargs(shape: dict, spi: int) -> dict:
    kw = dict(spi=spi, proto=IpProto.ESP, mode=shape["mode"], src=A, dst=B, replay_window=shape["window"],
              soft_packets=shape["soft"], hard_packets=shape["hard"], esn=shape["esn"], encap=shape["encap"])
    if shape["alg"] == "gcm":
        kw.update(enc_alg=EncAlg.AES_GCM_128, enc_key=GCM_KEY, icv_len=shape["icv"])
    else:
        kw.update(enc_alg=EncAlg.AES_CBC_128, enc_key=bytes(16), auth_alg=AuthAlg.SHA256, auth_key=bytes(32))
    if shape["mode"] == Mode.TUNNEL:
        kw.update(inner_src=A, inner_dst=B)
    if shape["v6"]:
        kw.update(src="fd00::1", dst="fd00::2")
    return kw


shapes = st.fixed_dictionaries({
    "alg": st.sampled_from(["gcm", "gcm", "gcm", "cbc"]),
    "icv": st.sampled_from([16, 16, 16, 8, 12]),
    "mode": st.sampled_from([Mode.TRANSPORT, Mode.TRANSPORT, Mode.TUNNEL]),
    "window": st.sampled_from([0, 32, 64]),
    "soft": st.sampled_from([0, 0, 0, 5]),
    "hard": st.sampled_from([0, 0, 0, 12]),
    "esn": st.sampled_from([False, False, False, True]),
    "encap": st.sampled_from([None, None, None, UdpEncap()]),
    "v6": st.sampled_from([False, False, False, False, True]),
    "filter": st.sampled_from([False, False, False, True]),
    "seq": st.sampled_from([0, 0, 0xFFFF_FF00]),
})


def card_state(fw: Firmware) -> tuple:
    entries = [sa for _, sa in fw.sadb.bundles()]
    engines = [state(e) for sa in entries for e in sa.built_engines()]
    return astuple(fw.stats()), engines, [sa.delete_requested for sa in entries]


def result_tuple(r) -> tuple:
    return tuple(getattr(r, f.name) for f in fields(r)) + (type(r.frame),)


class Rig:
    """A sending pair and a receiving pair of cards: fast and reference."""

    def __init__(self, shape: dict, caps: Capabilities) -> None:
        self.tx = Firmware(caps), GeneralFirmware(caps)
        self.rx = Firmware(caps), GeneralFirmware(caps)
        self.handles: list[tuple[int, bool]] = []
        for spi, po in ((0x100, True), (0x200, False)):
            kw = sa_kwargs(shape, spi)
            flt = TrafficFilter.from_prefixes(32, 0x0A000001, 32, 0x0A000002, 32, proto=6) if shape["filter"] else None
            if po and (shape["esn"] and not caps.esn):
                continue
            for fw in self.tx:
                h = fw.add_sa([SaParams(direction=Direction.OUTBOUND, seq=shape["seq"], **kw)], packet_offload=po)
            for fw in self.rx:
                fw.add_sa([SaParams(direction=Direction.INBOUND, **kw)], packet_offload=po, rx_filter=flt)
            self.handles.append((h, po))
        # build the engines now: the reference's lose their fast paths, CBC twins share an IV generator
        for fast, ref in (self.tx, self.rx):
            for (_, a), (_, b) in zip(fast.sadb.bundles(), ref.sadb.bundles(), strict=True):
                ea, eb = a.runtime(), b.runtime()
                if hasattr(eb, "_v4_encrypt"):
                    eb._v4_encrypt = eb._v4_decrypt = None
                same_iv_generator(ea, eb)

    def transmit(self, frame: bytes, handle: int, po: bool):
        a, b = (fw.transmit(frame, handle, po) for fw in self.tx)
        assert result_tuple(a) == result_tuple(b), ("transmit", frame.hex())
        assert a == b  # same class too: the fast paths build their results slot by slot
        assert card_state(self.tx[0]) == card_state(self.tx[1])
        return a

    def receive(self, frame: bytes):
        a, b = (fw.receive(frame) for fw in self.rx)
        assert result_tuple(a) == result_tuple(b), ("receive", frame.hex())
        assert a == b
        assert card_state(self.rx[0]) == card_state(self.rx[1])
        return a


def run(rng: random.Random, shape: dict, caps: Capabilities, frames: int, seen: Counter) -> None:
    rig = Rig(shape, caps)
    sent: list[bytes] = []
    icv = 16 if shape["alg"] == "gcm" and shape["icv"] == 16 else shape["icv"] if shape["alg"] == "gcm" else 16
    for _ in range(frames):
        handle, po = rng.choice(rig.handles)
        if po:
            payload = rng.randbytes(rng.choice((0, 1, 8, 30, 500, 1380)))
            kind = rng.randrange(8)
            if kind == 0:
                ip = ipv4(rng, payload, 17, options=b"\x01\x01\x01\x00")  # IP options
            elif kind == 1:
                ip = ipv6(rng, payload, 17)
            else:
                ip = ipv4(rng, payload, rng.choice((17, 6, 59)))
            frame = (VLAN_ETH if rng.random() < 0.1 else ETH) + ip
        else:
            esp = host_built_esp(rng, 0x200 if rng.random() < 0.95 else 0x999, rng.randrange(1, 40), icv)
            frame = ETH + (ipv6(rng, esp, 50) if shape["v6"] else ipv4(rng, esp, 50))
        if rng.random() < 0.15:
            frame = mutate(rng, frame)
        out = rig.transmit(frame, handle if rng.random() < 0.95 else rng.choice((0, 12345)), po)
        seen["tx", out.status] += 1
        if out.frame is not None and out.status == 0:
            sent.append(out.frame)
        if not sent:
            continue
        wire = rng.choice(sent) if rng.random() < 0.2 else sent[-1]  # replays too
        if rng.random() < 0.3:
            wire = mutate(rng, wire)
        got = rig.receive(wire)
        seen["rx", got.verdict, got.crypto_done] += 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, seed=st.integers(0, 2**32 - 1), combined=st.booleans())
def test_frame_fast_paths_agree_with_the_general_code(shape, seed, combined):
    caps = Capabilities(transport_tunnel_combined=combined, ipv4_options=combined)
    run(random.Random(seed), shape, caps, 40, Counter())


def test_frame_fast_paths_agree_on_the_fast_shape_at_length():
    """Mostly the fast shape, long runs: the mutations reach every outcome, so agreement means something."""
    seen: Counter = Counter()
    rng = random.Random(7)
    base = dict(alg="gcm", icv=16, mode=Mode.TRANSPORT, soft=0, hard=0, esn=False, encap=None, v6=False,
                filter=False, seq=0)
    for window in (0, 64):
        for seq in (0, 0xFFFF_FF00):
            run(rng, {**base, "window": window, "seq": seq}, Capabilities(), 400, seen)
    for key in [("rx", 0, True), ("rx", 1, True), ("rx", 2, True), ("rx", 3, True), ("rx", 7, True),
                ("rx", -1, False), ("tx", 0), ("tx", 2), ("tx", 3)]:
        assert seen[key] > 0, f"no {key} in {dict(seen)}"


def test_a_deleted_sa_is_not_used_from_the_plan_cache():
    caps = Capabilities()
    fw = Firmware(caps)
    kw = sa_kwargs(dict(alg="gcm", icv=16, mode=Mode.TRANSPORT, window=64, soft=0, hard=0, esn=False, encap=None,
                        v6=False), 0x300)
    h = fw.add_sa([SaParams(direction=Direction.OUTBOUND, **kw)], packet_offload=True)
    rin = fw.add_sa([SaParams(direction=Direction.INBOUND, **kw)], packet_offload=True)
    frame = ETH + ipv4(random.Random(1), b"x" * 100, 17)
    wire = fw.transmit(frame, h, True)
    assert wire.status == 0 and fw.receive(wire.frame).verdict == 0
    fw.sadb.remove(h)
    fw.sadb.remove(rin)
    assert fw.transmit(frame, h, True).status == 2  # TxOutcome.BAD_HANDLE
    assert fw.receive(fw.transmit(frame, h, True).frame or wire.frame).handle == 0  # no SA any more
    fw.reset()
    assert fw.transmit(frame, h, True).status == 2


def test_fast_frame_counts_reach_get_stats_and_reset_clears_them():
    """The fast paths count a frame in plain ints on the card (framepath.fold_counts): GET_STATS must
    report them as the general code counts its frames, and a function reset must restart them."""
    from device.contract import ndis
    from device.contract.ndis import Opcode

    kw = sa_kwargs(dict(alg="gcm", icv=16, mode=Mode.TRANSPORT, window=64, soft=0, hard=0, esn=False, encap=None,
                        v6=False), 0x400)
    kwc = sa_kwargs(dict(alg="gcm", icv=16, mode=Mode.TRANSPORT, window=64, soft=0, hard=0, esn=False, encap=None,
                         v6=False), 0x500)
    fw, ref = Firmware(Capabilities()), GeneralFirmware(Capabilities())
    rng = random.Random(3)
    # the 8-byte one is too short for the fast paths (< 68 B frame): general and fast counts add up
    plain = [ETH + ipv4(rng, rng.randbytes(n), 17) for n in (8, 40, 700, 1380)]
    # host-built ESP (RFC 4303 §2: header, IV room, UDP payload, padding 1, 2, ..., trailer, ICV room)
    host_esp = [ETH + ipv4(rng, struct.pack("!II", 0x500, i) + bytes(8) + rng.randbytes(n) + bytes(range(1, pad + 1))
                           + bytes((pad, 17)) + bytes(16), 50) for i, (n, pad) in enumerate(((30, 0), (701, 1), (1380, 2)), 1)]
    sizes: dict = {}
    for card in (fw, ref):
        sizes[card] = [0, 0]
        h_po = card.add_sa([SaParams(direction=Direction.OUTBOUND, **kw)], packet_offload=True)
        card.add_sa([SaParams(direction=Direction.INBOUND, **kw)], packet_offload=True)
        h_c = card.add_sa([SaParams(direction=Direction.OUTBOUND, **kwc)])
        card.add_sa([SaParams(direction=Direction.INBOUND, **kwc)])
        for frame, handle, po in [(f, h_po, True) for f in plain] + [(f, h_c, False) for f in host_esp]:
            out = card.transmit(frame, handle, po)
            assert out.status == 0 and card.receive(out.frame).crypto_status == 0
            sizes[card][0] += len(frame)
            sizes[card][1] += len(out.frame)
    assert (fw._fast_tx_packet, fw._fast_tx_crypto, fw._fast_rx) == (3, 3, 7)  # the fast paths ran
    assert (ref._fast_tx_packet, ref._fast_tx_crypto, ref._fast_rx) == (0, 0, 0)
    fast_wire = fw.execute(Opcode.GET_STATS, b"")[1]
    ref_wire = ref.execute(Opcode.GET_STATS, b"")[1]
    assert fast_wire == ref_wire
    st = ndis.GlobalStats.unpack(fast_wire)
    assert (st.tx_packets, st.tx_packet_offload, st.tx_crypto) == (7, 4, 3)
    assert (st.rx_packets, st.rx_crypto_ok, st.rx_crypto_done) == (7, 7, 7)
    assert [st.tx_bytes, st.rx_bytes] == sizes[fw]
    fw.reset()
    st = fw.stats()
    assert (st.tx_packets, st.tx_bytes, st.tx_crypto, st.tx_packet_offload) == (0, 0, 0, 0)
    assert (st.rx_packets, st.rx_bytes, st.rx_crypto_ok, st.rx_crypto_done) == (0, 0, 0, 0)
