"""Whole-frame fast paths of Firmware.transmit / Firmware.receive, fenced off from the general code.

For an SA of the commonest shape -- one ESP SA whose engine is a FastV4EspEngine (AES-GCM-16, no ESN,
transport, IPv4, no UDP encapsulation: firmware_model/fastpath.py) with no lifetimes and no traffic filter
-- and an untagged Ethernet frame carrying option-less, unfragmented IPv4, these functions go from the
frame to the output frame in one step: no L3 offset search, no classification layer, no `frame[l3:]`,
no re-framing, Ethernet + IP + ESP headers packed in one call, the result object built once.

The rule that keeps them honest: a fast path either produces the *complete successful* result -- the
frame, every counter, the engine's state, SaDeleteReq -- exactly as the general code
(traffic.TrafficPath.transmit / receive) would, or it changes nothing and hands the frame to the general
code, which stays the reference for every other shape and every error verdict. Receive bails out before
anything is counted or moved: a replayed or forged packet, a bad trailer, a dummy packet or a nested
tunnel payload is left entirely to the general code (which then checks the ICV again: error verdicts
cost twice the crypto, successful ones once).

The per-SA "plans" are cached in two dicts that firmware.PlanSadb empties on every add, remove and
reset of the SA table, so a plan never outlives its SA: by handle for transmit; by SPI for receive, with
the destination address the SA was found for (lookup_inbound matches an exact destination before a
wildcard one, so a plan is reused only for the very destination it was looked up with).
tests/firmware/test_frame_fastpath.py compares a card with these paths against one without, on random
and mutated frames and SA shapes.
"""

from __future__ import annotations

import struct
from typing import Any

from cryptography.exceptions import InvalidTag

from device.contract.enums import Direction, IpProto
from device.contract.status import CryptoStatus
from firmware_model.engine import FastV4EspEngine
from firmware_model.esp import PAD_BYTES
from firmware_model.replay import REJECT
from firmware_model.traffic import SEQ_SOFT_MARGIN, U32_MAX, RxResult, TrafficPath, TxOutcome, TxResult

# Option-less IPv4 header (see fastpath._V4_FIELDS) + ESP SPI, Seq and the 8-byte GCM IV (RFC 4303 §2,
# RFC 4106 §3.1): one pack writes every IP and ESP header byte of an output frame, one unpack reads them
# (the Ethernet header is joined as it came: the frame may be any bytes-like object). Adjacent fields are
# merged where only their sum matters for the checksum (fastpath._V4_IN): TTL || protocol,
# source || destination; pad bytes ('x') skip what a path does not read.
_V4_IN = struct.Struct("!HHIHHQ")
_V4_IN_UNPACK_FROM = _V4_IN.unpack_from
_V4_IN_PACK = _V4_IN.pack
_V4_GCM_PACK = struct.Struct("!HHIHHQQQ").pack  # ... + SPI || Seq (the AAD, RFC 4106 §5) + IV
_V4_RX_UNPACK_FROM = struct.Struct("!HHIH2xQIIQ").unpack_from  # no checksum; SPI and Seq apart
_V4_CRYPTO_TX_UNPACK_FROM = struct.Struct("!2xHIxB10xII").unpack_from  # total, id+flags, proto, SPI, Seq
_NONCE_PACK = struct.Struct("!4sQ").pack  # RFC 4106 §4: salt || IV
_U64_PACK = struct.Struct("!Q").pack
_IP_MF_OFFSET_MASK = 0x3FFF
_ESP = 50
_NONE = 59  # RFC 4303 §2.6: dummy packet
_NESTED = (4, 41)  # an IP packet inside the ESP: transport over tunnel, the general code's business
# packet offload: ESP adds 16 header bytes, at most 5 trailer bytes and the 16-byte tag (fastpath._V4_FAST_MAX)
_V4_FAST_MAX = 0xFFFF - 16 - 5 - 16
_SEQ_NEAR_END = U32_MAX - SEQ_SOFT_MARGIN
_PLAN_CACHE_MAX = 4096  # unknown handles / SPIs must not grow the caches without bound

_TX_OK = TxOutcome.OK
_CS_SUCCESS = int(CryptoStatus.SUCCESS)
_OUTBOUND = Direction.OUTBOUND
_INBOUND = Direction.INBOUND
_ESP_PROTO = IpProto.ESP
_general_transmit = TrafficPath.transmit
_general_receive = TrafficPath.receive
# The results are built by storing their slots on a bare instance: ~100 ns less per RxResult (~30 ns per
# TxResult) than the dataclass __init__ call on Python 3.11. Every field must be stored (an unset slot
# raises AttributeError when read); tests/firmware/test_frame_fastpath.py compares them field by field.
_new = object.__new__


def clear_counts(fw: Any) -> None:
    """Zero the fast paths' own frame counters. They are kept as plain ints on the Firmware object (an
    increment there costs a third of one on GlobalStats, whose 37 fields are too many for a key-sharing
    dict) and added to GlobalStats only when it is read (fold_counts): a fast frame counts one frame
    and its bytes instead of three or four GlobalStats fields."""
    fw._fast_tx_crypto = fw._fast_tx_packet = fw._fast_tx_bytes = fw._fast_rx = fw._fast_rx_bytes = 0


def fold_counts(fw: Any, st: Any) -> None:
    """Add the fast paths' counts to `st` (a GlobalStats copy), as the general code would have counted
    those frames: transmit tx_packets, tx_bytes and tx_crypto or tx_packet_offload; receive (every fast
    frame passed its check) rx_packets, rx_bytes, rx_crypto_ok and rx_crypto_done."""
    st.tx_packets += fw._fast_tx_crypto + fw._fast_tx_packet
    st.tx_bytes += fw._fast_tx_bytes
    st.tx_crypto += fw._fast_tx_crypto
    st.tx_packet_offload += fw._fast_tx_packet
    st.rx_packets += fw._fast_rx
    st.rx_bytes += fw._fast_rx_bytes
    st.rx_crypto_ok += fw._fast_rx
    st.rx_crypto_done += fw._fast_rx


def _plan_for(sa: Any, direction: Direction) -> tuple | None:
    """(packet offload, entry, engine, AEAD function, salt, replay window, engine counters) for an SA the
    fast paths may take, else None. The engine's members are read once here rather than per frame: none of
    them is ever replaced on an engine, and a plan lives no longer than its SA (module docstring)."""
    if (sa is None or sa.direction != direction or len(sa.params) != 1 or sa.params[0].proto != _ESP_PROTO
            or sa.rx_filter is not None):
        return None
    rt = sa.runtime()
    # lifetimes go the general way: their checks and SaDeleteReq bookkeeping are per packet
    if type(rt) is not FastV4EspEngine or rt._limited:
        return None
    aead = rt._v4_encrypt if direction == _OUTBOUND else rt._v4_decrypt
    if aead is None:  # the engine's own fast path switched off (the differential tests' reference)
        return None
    return bool(sa.packet_offload), sa, rt, aead, rt._gcm_salt, rt.window, rt.stats


def transmit(self: Any, frame: bytes, handle: int, packet_offload: bool, seq_hi: int | None = None,
             tunnel_handle: int = 0) -> TxResult:
    """Firmware.transmit: the fast paths below, else TrafficPath.transmit (see the module docstring)."""
    plans = self._tx_plans
    plan = plans.get(handle)
    if plan is None:
        if tunnel_handle or not handle:
            return _general_transmit(self, frame, handle, packet_offload, seq_hi, tunnel_handle)
        if len(plans) >= _PLAN_CACHE_MAX:
            plans.clear()
        plan = plans[handle] = _plan_for(self.sadb.get(handle), _OUTBOUND) or False
    if plan and not tunnel_handle:
        po, sa, eng, encrypt, salt, _, est = plan
        n = len(frame)
        # untagged Ethernet, option-less IPv4 (l3_offset's common case)
        if n >= 68 and frame[14] == 0x45 and frame[12] == 8 and not frame[13]:
            if packet_offload:
                if po:
                    # fastpath.encapsulate_v4 + reframe, into one output frame; numbers that need a check
                    # (near the limit, or not above the last IV) go the general way
                    seq = eng._seq + 1
                    if seq < eng._fast_seq_end and seq > eng._iv_last:
                        vt, total, idf, tp, _, sd = _V4_IN_UNPACK_FROM(frame, 14)
                        if 20 <= total <= n - 14 and total <= _V4_FAST_MAX and not idf & _IP_MF_OFFSET_MASK:
                            nh = tp & 0xFF
                            plaintext = frame[34:14 + total] + eng._trailers[nh][total & 3]
                            out_total = 52 + len(plaintext)
                            tp += _ESP - nh  # TTL kept, protocol ESP
                            head = _V4_GCM_PACK(vt, out_total, idf, tp, -(vt + out_total + idf + tp + sd) % 0xFFFF,
                                                sd, eng._spi_hi | seq, seq)
                            sealed = encrypt(_NONCE_PACK(salt, seq), plaintext, head[20:28])
                            eng._seq = eng._iv_last = seq
                            est.packets += 1
                            est.bytes += total
                            self._fast_tx_packet += 1  # fold_counts
                            self._fast_tx_bytes += n
                            if eng.soft_expired or eng.seq_nearly_exhausted:  # _check_lifetime
                                self.sadb.request_delete(sa)
                            r = _new(TxResult)
                            r.status = _TX_OK
                            r.frame = b"".join((frame[:14], head, sealed))
                            r.sa_delete_req = sa.delete_requested
                            return r
            elif not po:
                # fastpath.crypto_encrypt_v4 on the frame, the result built directly
                total, idf, proto, spi, seq_lo = _V4_CRYPTO_TX_UNPACK_FROM(frame, 14)
                if (proto == _ESP and not idf & _IP_MF_OFFSET_MASK and 54 <= total <= n - 14
                        and spi == eng.spi):
                    iv_last = eng._iv_last
                    seq_iv = seq_lo if seq_lo > iv_last else iv_last + 1
                    eng._iv_last = seq_iv
                    end = 14 + total
                    sealed = encrypt(_NONCE_PACK(salt, seq_iv), frame[50:end - 16], frame[34:42])
                    est.packets += 1
                    est.bytes += total
                    self._fast_tx_crypto += 1  # fold_counts
                    self._fast_tx_bytes += n
                    if seq_lo > _SEQ_NEAR_END:  # TrafficPath._seq_near_end (no ESN on this shape)
                        self.sadb.request_delete(sa)
                    if eng.soft_expired or eng.seq_nearly_exhausted:  # _check_lifetime
                        self.sadb.request_delete(sa)
                    r = _new(TxResult)
                    r.status = _TX_OK
                    if end == n:
                        r.frame = b"".join((frame[:42], _U64_PACK(seq_iv), sealed))
                    else:  # link-layer padding after the IP packet stays as it was
                        r.frame = b"".join((frame[:42], _U64_PACK(seq_iv), sealed, frame[end:]))
                    r.sa_delete_req = sa.delete_requested
                    return r
    return _general_transmit(self, frame, handle, packet_offload, seq_hi, tunnel_handle)


def receive(self: Any, frame: bytes) -> RxResult:
    """Firmware.receive: the fast paths below, else TrafficPath.receive (see the module docstring)."""
    n = len(frame)
    if n >= 68 and frame[14] == 0x45 and frame[12] == 8 and not frame[13]:
        vt, total, idf, tp, sd, spi, seq_lo, iv = _V4_RX_UNPACK_FROM(frame, 14)
        if tp & 0xFF == _ESP and not idf & _IP_MF_OFFSET_MASK and 54 <= total <= n - 14:
            dst = sd & 0xFFFF_FFFF
            plans = self._rx_plans
            hit = plans.get(spi)
            if hit is None or hit[0] != dst:
                if len(plans) >= _PLAN_CACHE_MAX:
                    plans.clear()
                found = self.sadb.lookup_inbound(spi, frame[30:34], _ESP)
                hit = plans[spi] = (dst, _plan_for(found[0], _INBOUND) if found is not None else None)
            plan = hit[1]
            if plan is not None:
                po, sa, eng, decrypt, salt, window, est = plan
                if spi == eng.spi:
                    end = 14 + total
                    # (the two cases are written out here rather than called: a call layer is ~5 % of a frame)
                    if po and total >= 56:
                        # packet offload: fastpath.decapsulate_v4 + reframe. The window's check() is only
                        # called for a number at or below its top, and not at all when it is off (size 0:
                        # any non-zero number passes, RFC 4303 §3.4.3 lets the receiver skip the check)
                        top = window.top
                        if seq_lo <= top and (window.size or not seq_lo) and window.check(seq_lo) == REJECT:
                            return _general_receive(self, frame)
                        try:
                            plain = decrypt(_NONCE_PACK(salt, iv), frame[50:end], frame[34:42])
                        except InvalidTag:
                            return _general_receive(self, frame)
                        k = len(plain)
                        padlen = plain[-2]
                        payload_len = k - 2 - padlen
                        nh = plain[-1]
                        if (payload_len < 0 or (padlen and plain[payload_len:k - 2] != PAD_BYTES[:padlen])
                                or nh == _NONE):
                            return _general_receive(self, frame)
                        # only now is anything moved: the window (accept() cannot refuse what check() let
                        # through; if it did, nothing would have changed), then the counters
                        if seq_lo > top:
                            if window.size:
                                window.accept(seq_lo)  # cannot refuse a number above the top
                            else:
                                window.top = seq_lo
                        elif window.size and not window.accept(seq_lo):
                            return _general_receive(self, frame)
                        out_total = 20 + payload_len
                        est.packets += 1
                        est.bytes += out_total
                        self._fast_rx += 1  # fold_counts
                        self._fast_rx_bytes += n
                        if eng.soft_expired or eng.seq_nearly_exhausted:  # _check_lifetime
                            self.sadb.request_delete(sa)
                        r = _new(RxResult)
                        r.sa_delete_req = delete_req = sa.delete_requested
                        if delete_req:
                            self._stats.rx_sa_delete_req += 1
                        tp += nh - _ESP  # TTL kept, protocol from the trailer
                        r.frame = b"".join((frame[:14], _V4_IN_PACK(vt, out_total, idf, tp,
                                                                    -(vt + out_total + idf + tp + sd) % 0xFFFF, sd),
                                            plain[:payload_len]))
                        r.crypto_done = r.decapsulated = True
                        r.crypto_status = _CS_SUCCESS
                        r.handle = sa.handle
                        r.verdict = r.pad_length = r.next_handle = 0
                        r.next_header = -1
                        r.next_crypto_done = r.discard = r.replay_drop = False
                        r.policy_mismatch = r.policy_drop = r.l4_csum_ok = False
                        return r
                    if not po:
                        # crypto offload: fastpath.crypto_decrypt_v4 on the frame
                        try:
                            plain = decrypt(_NONCE_PACK(salt, iv), frame[50:end], frame[34:42])
                        except InvalidTag:
                            return _general_receive(self, frame)
                        k = len(plain)
                        padlen = plain[-2]
                        nh = plain[-1]
                        if (k < 2 + padlen or (padlen and plain[k - 2 - padlen:k - 2] != PAD_BYTES[:padlen])
                                or nh == _NONE or nh in _NESTED):
                            return _general_receive(self, frame)
                        est.packets += 1
                        est.bytes += total
                        self._fast_rx += 1  # fold_counts
                        self._fast_rx_bytes += n
                        # only an authenticated sequence number may ask for a rekey (TrafficPath.receive)
                        if seq_lo > _SEQ_NEAR_END:
                            self.sadb.request_delete(sa)
                        if eng.soft_expired or eng.seq_nearly_exhausted:  # _check_lifetime
                            self.sadb.request_delete(sa)
                        r = _new(RxResult)
                        r.sa_delete_req = delete_req = sa.delete_requested
                        if delete_req:
                            self._stats.rx_sa_delete_req += 1
                        # the decrypted payload in place of the ciphertext; the ICV and any link-layer
                        # padding stay; the trailer the host is told about (esp_trailer) is the one checked
                        r.frame = b"".join((frame[:50], plain, frame[end - 16:]))
                        r.crypto_done = True
                        r.crypto_status = _CS_SUCCESS
                        r.handle = sa.handle
                        r.verdict = r.next_handle = 0
                        r.next_header = nh
                        r.pad_length = padlen
                        r.next_crypto_done = r.discard = r.replay_drop = r.decapsulated = False
                        r.policy_mismatch = r.policy_drop = r.l4_csum_ok = False
                        return r
    return _general_receive(self, frame)

