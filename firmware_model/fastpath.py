"""The engine's speed-tuned paths, fenced off from the general code they must agree with.

An ESP SA of the commonest shape -- AES-GCM with a 16-byte ICV, no ESN, transport mode, option-less
unfragmented IPv4, no UDP encapsulation -- is a FastV4EspEngine (firmware_model/engine.py), whose
encapsulate / decapsulate / crypto_encrypt / crypto_decrypt are the functions below: the caller enters
the fast code directly, with no dispatching wrapper in between (a Python call layer is ~100 ns, a fifth
of the AES-GCM call at 64 bytes). Any packet they do not take -- and every error verdict that can come
before the ICV check -- goes to the general code (``eng._general_*``, EspEngine's methods), which stays
the reference; so does any engine whose ``_v4_encrypt`` / ``_v4_decrypt`` is cleared. The AES-GCM
encapsulate / decapsulate come in two layers: the straightest case (no lifetimes, a sequence number far
from its limit and above every IV used, a number the replay bitmap need not be consulted for) runs with
one compare for all of that; any other packet goes to the ``_checked`` variant, the same code with
those checks, which hands what it does not take to the general code in turn.
tests/firmware/fastpath_diff.py feeds the same random and mutated traffic to an engine with and without
these paths and requires identical results.
"""

from __future__ import annotations

import struct
from hmac import compare_digest as _hmac_compare_digest
from typing import Any

from cryptography.exceptions import InvalidTag

from device.contract.net import IPPROTO_ESP, IPPROTO_NONE
from firmware_model.esp import PAD_BYTES, U64, Verdict, strip_trailer
from firmware_model.replay import REJECT

_IP_MF_OFFSET_MASK = 0x3FFF  # IPv4 "more fragments" flag + fragment offset
# Fast-path layouts for an option-less IPv4 header (RFC 791): ver/IHL+TOS, total length, id+flags/fragment
# as one 32-bit word, TTL, protocol, checksum, source, destination. Reading the 32-bit words whole keeps
# the header checksum to one expression: 2^16 = 1 (mod 0xFFFF), so the ones' complement sum of the
# 16-bit words (RFC 1071) of a non-zero header is congruent to the sum of these fields, and the checksum
# is (-sum) % 0xFFFF -- the same value the word-by-word fold gives (a fold of 0xFFFF gives 0 both ways).
_V4_FIELDS = struct.Struct("!HHIBBHII")
# the same header followed by ESP SPI, Seq and the 8-byte GCM IV (RFC 4303 §2, RFC 4106 §3.1): one pack
# writes every header byte of a transport-mode ESP packet, one unpack reads them back
_V4_ESP = struct.Struct("!HHIBBHIIIIQ")
_V4_ESP_LEN = 36
_V4_ESP_HEAD = struct.Struct("!HHIBBHIIII")  # _V4_ESP without the IV
_V4_FIELDS_UNPACK_FROM = _V4_FIELDS.unpack_from
_V4_FIELDS_PACK = _V4_FIELDS.pack
_V4_ESP_PACK = _V4_ESP.pack
_V4_ESP_UNPACK_FROM = _V4_ESP.unpack_from
# ESP adds 36 - 20 header bytes, at most 5 trailer bytes and a 16-byte ICV to an IPv4 packet; larger
# packets take the general path, which refuses results over the 65535-byte IPv4 limit
_V4_FAST_MAX = 0xFFFF - (_V4_ESP_LEN - 20) - 5 - 16
# The same header read with adjacent fields merged where only their sum matters: TTL || protocol as one
# 16-bit word, source || destination as one 64-bit field (2^32 = 1 mod 0xFFFF too, so the checksum
# sum is unchanged). Fewer fields are fewer Python ints made and read per packet.
_V4_IN = struct.Struct("!HHIHHQ")
_V4_IN_UNPACK_FROM = _V4_IN.unpack_from
_V4_IN_PACK = _V4_IN.pack
# ... followed by SPI || Seq as one 64-bit field (the AAD, RFC 4106 §5) and the 8-byte IV
_V4_GCM = struct.Struct("!HHIHHQQQ")
_V4_GCM_PACK = _V4_GCM.pack
_V4_GCM_UNPACK_FROM = _V4_GCM.unpack_from
_NONCE_PACK = struct.Struct("!4sQ").pack  # RFC 4106 §4: nonce = 4-byte salt || 8-byte IV
_U64_PACK_INTO = U64.pack_into
# Enum member lookups through the class cost ~0.3 us each on Python 3.11; the hot paths use these.
_OK = Verdict.OK
_AUTH_FAILED = Verdict.AUTH_FAILED
_REPLAY = Verdict.REPLAY
_BAD_SYNTAX = Verdict.BAD_SYNTAX
_DUMMY = Verdict.DUMMY
_HARD_LIMIT = Verdict.HARD_LIMIT


def crypto_encrypt_v4(eng: Any, frame: bytearray, l3: int, seq_hi: int | None = None, *,
                      iv: bytes | None = None) -> Verdict:
    if eng._limited and eng._over_hard_limit():
        return _HARD_LIMIT
    encrypt = eng._v4_encrypt
    if encrypt is not None and iv is None and len(frame) >= l3 + 54 and frame[l3] == 0x45:
        # fast path (see EspEngine.__init__): unfragmented option-less IPv4 with this SA's ESP header and at
        # least 2 bytes between the IV and ICV room (_body_ok); anything else goes the general way
        _, total, idf, _, proto, _, _, _, spi, seq_lo = _V4_ESP_HEAD.unpack_from(frame, l3)
        if (proto == IPPROTO_ESP and not idf & _IP_MF_OFFSET_MASK and 54 <= total <= len(frame) - l3
                and spi == eng.spi):
            seq_iv = seq_lo if seq_lo > eng._iv_last else eng._iv_last + 1  # never a repeated IV
            eng._iv_last = seq_iv
            e = l3 + 20
            a = e + 16
            end = l3 + total
            sealed = encrypt(_NONCE_PACK(eng._gcm_salt, seq_iv), frame[a:end - 16], frame[e:e + 8])
            _U64_PACK_INTO(frame, e + 8, seq_iv)
            frame[a:end] = sealed
            eng._count(total)
            return _OK
    return eng._general_crypto_encrypt(frame, l3, seq_hi, iv=iv)


def crypto_decrypt_v4(eng: Any, frame: bytearray, l3: int) -> Verdict:
    if eng._limited and eng._over_hard_limit():
        return _HARD_LIMIT
    decrypt = eng._v4_decrypt
    if decrypt is not None and len(frame) >= l3 + 54 and frame[l3] == 0x45:
        # fast path, the same shape as crypto_encrypt's
        _, total, idf, _, proto, _, _, _, spi, _, iv = _V4_ESP.unpack_from(frame, l3)
        if (proto == IPPROTO_ESP and not idf & _IP_MF_OFFSET_MASK and 54 <= total <= len(frame) - l3
                and spi == eng.spi):
            e = l3 + 20
            a = e + 16
            end = l3 + total
            try:
                plain = decrypt(_NONCE_PACK(eng._gcm_salt, iv), frame[a:end], frame[e:e + 8])
            except InvalidTag:
                return eng._fail(_AUTH_FAILED)
            frame[a:end - 16] = plain
            payload_len, nh = strip_trailer(plain)
            if payload_len < 0:
                return eng._fail(_BAD_SYNTAX)
            eng._count(total)
            if nh == IPPROTO_NONE:
                eng.stats.dummy_packets += 1
                return _DUMMY
            return _OK
    return eng._general_crypto_decrypt(frame, l3)


def encapsulate_v4(eng: Any, ip_packet: bytes, *, iv: bytes | None = None) -> tuple[Verdict, bytes]:
    seq = eng._seq + 1
    encrypt = eng._v4_encrypt
    n = len(ip_packet)
    # The straightest case: no lifetimes, the number far from its limit (_fast_seq_end, one compare for
    # both) and above every IV used so far (so IV = Seq). Anything else -- and any packet of another
    # shape -- goes to _encapsulate_v4_checked, the same code with those checks, or on to the general code.
    if seq < eng._fast_seq_end and seq > eng._iv_last and n >= 20 and iv is None and encrypt is not None:
        vt, total, idf, tp, _, sd = _V4_IN_UNPACK_FROM(ip_packet)
        if total <= n and 20 <= total <= _V4_FAST_MAX and not idf & _IP_MF_OFFSET_MASK and vt >> 8 == 0x45:
            nh = tp & 0xFF
            plaintext = ip_packet[20:total] + eng._trailers[nh][total & 3]
            out_total = 52 + len(plaintext)
            tp += IPPROTO_ESP - nh  # TTL kept, protocol ESP
            head = _V4_GCM_PACK(vt, out_total, idf, tp, -(vt + out_total + idf + tp + sd) % 0xFFFF, sd,
                                eng._spi_hi | seq, seq)
            sealed = encrypt(_NONCE_PACK(eng._gcm_salt, seq), plaintext, head[20:28])
            eng._seq = eng._iv_last = seq
            st = eng.stats
            st.packets += 1
            st.bytes += total
            return _OK, head + sealed
    return _encapsulate_v4_checked(eng, ip_packet, iv)


def _encapsulate_v4_checked(eng: Any, ip_packet: bytes, iv: bytes | None) -> tuple[Verdict, bytes]:
    limited = eng._limited
    if limited and eng._over_hard_limit():
        return _HARD_LIMIT, b""
    encrypt = eng._v4_encrypt
    n = len(ip_packet)
    if n >= 20 and ip_packet[0] == 0x45 and encrypt is not None and iv is None:
        # fast path (see EspEngine.__init__): option-less IPv4, AES-GCM-16, no ESN, transport, no UDP-ESP
        vt, total, idf, ttl, nh, _, src, dst = _V4_FIELDS_UNPACK_FROM(ip_packet)
        seq = eng._seq + 1
        # (a fragment, MF or offset set in idf's low bits, takes the general path, which refuses it)
        # (_seq_warn < _seq_limit: one compare per packet; the limit is checked once past the warning)
        if (20 <= total <= n and total <= _V4_FAST_MAX and not idf & 0x3FFF
                and (seq < eng._seq_warn or seq <= eng._seq_limit)):
            if seq >= eng._seq_warn:
                eng.seq_nearly_exhausted = True
            # IV = sequence number, forced strictly increasing (module docstring); below 2^33 without
            # ESN, so no 64-bit masking is needed
            iv_last = eng._iv_last
            seq_iv = iv_last + 1 if seq <= iv_last else seq
            eng._iv_last = seq_iv
            # RFC 4303 §2.4: payload, padding 1, 2, 3, ..., pad length, next header (align 4 for GCM)
            plaintext = ip_packet[20:total] + eng._trailers[nh][total & 3]
            # The result's length is known before sealing (36 header bytes, the 16-byte tag), so all
            # headers are packed first and the AAD, SPI || Seq (RFC 4106 §5), is sliced from them.
            out_total = 52 + len(plaintext)
            csum = -(vt + out_total + idf + (ttl << 8 | IPPROTO_ESP) + src + dst) % 0xFFFF
            head = _V4_ESP_PACK(vt, out_total, idf, ttl, IPPROTO_ESP, csum, src, dst, eng.spi, seq, seq_iv)
            sealed = encrypt(_NONCE_PACK(eng._gcm_salt, seq_iv), plaintext, head[20:28])
            eng._seq = seq
            if limited:
                eng._count(total)
            else:  # _count without the lifetime checks (a call layer less)
                st = eng.stats
                st.packets += 1
                st.bytes += total
            return _OK, head + sealed
    return eng._general_encapsulate(ip_packet, iv=iv)


def decapsulate_v4(eng: Any, ip_packet: bytes) -> tuple[Verdict, bytes]:
    decrypt = eng._v4_decrypt
    n = len(ip_packet)
    # The straightest case: no lifetimes, this SA's SPI, and a sequence number that needs no look into the
    # replay bitmap -- above the window's top, or any non-zero number when the window is off (size 0:
    # check() lets it through and accept() has nothing to do). Anything else goes to
    # _decapsulate_v4_checked, the same code with the window's check, or on to the general code.
    if n >= 56 and decrypt is not None and not eng._limited:
        vt, total, idf, tp, _, sd, spi_seq, iv = _V4_GCM_UNPACK_FROM(ip_packet)
        seq = spi_seq - eng._spi_hi  # the sequence number, when the SPI is this SA's (else out of range)
        window = eng.window
        top = window.top
        if (56 <= total <= n and tp & 0xFF == IPPROTO_ESP and not idf & _IP_MF_OFFSET_MASK and vt >> 8 == 0x45
                and 0 < seq <= 0xFFFF_FFFF and (seq > top or not window.size)):
            try:
                plain = decrypt(_NONCE_PACK(eng._gcm_salt, iv), ip_packet[_V4_ESP_LEN:total], ip_packet[20:28])
            except InvalidTag:
                return eng._fail(_AUTH_FAILED), b""
            if seq > top:  # only an authenticated number moves the window (RFC 4303 §3.4.3)
                if window.size:
                    window.accept(seq)  # cannot refuse a number above the top
                else:
                    window.top = seq
            k = len(plain)  # >= 4: total >= 56 leaves 4 bytes between IV and ICV
            padlen = plain[-2]
            payload_len = k - 2 - padlen
            if payload_len < 0 or (padlen and plain[payload_len:k - 2] != PAD_BYTES[:padlen]):
                return eng._fail(_BAD_SYNTAX), b""  # RFC 4303 §2.4: padding must be 1, 2, 3, ...
            nh = plain[-1]
            if nh == IPPROTO_NONE:  # RFC 4303 §2.6: dummy packet, discard silently
                eng.stats.dummy_packets += 1
                eng._count(0)
                return _DUMMY, b""
            out_total = 20 + payload_len
            tp += nh - IPPROTO_ESP  # TTL kept, protocol from the trailer
            st = eng.stats
            st.packets += 1
            st.bytes += out_total
            return _OK, _V4_IN_PACK(vt, out_total, idf, tp, -(vt + out_total + idf + tp + sd) % 0xFFFF, sd) + plain[:payload_len]
    return _decapsulate_v4_checked(eng, ip_packet)


def _decapsulate_v4_checked(eng: Any, ip_packet: bytes) -> tuple[Verdict, bytes]:
    limited = eng._limited
    if limited and eng._over_hard_limit():
        return _HARD_LIMIT, b""
    decrypt = eng._v4_decrypt
    if len(ip_packet) >= 56 and ip_packet[0] == 0x45 and decrypt is not None:
        # fast path (see EspEngine.__init__): an unfragmented option-less IPv4 packet carrying this SA's ESP
        # with room for IV, the 4 smallest trailer bytes and ICV (_min_body); anything else -- and
        # every error verdict before the ICV check -- is left to the general code below
        vt, total, idf, ttl, proto, _, src, dst, spi, seq_lo, iv = _V4_ESP_UNPACK_FROM(ip_packet)
        if (proto == IPPROTO_ESP and not idf & _IP_MF_OFFSET_MASK and 56 <= total <= len(ip_packet)
                and spi == eng.spi):
            window = eng.window
            # RFC 4303 §3.4.3: early reject before the ICV work. No ESN here, so the number is seq_lo;
            # one above the window's top (in-order traffic) passes without the window's own check.
            seq = seq_lo if seq_lo > window.top else window.check(seq_lo)
            if seq == REJECT:
                return eng._fail(_REPLAY), b""
            try:
                plain = decrypt(_NONCE_PACK(eng._gcm_salt, iv), ip_packet[_V4_ESP_LEN:total], ip_packet[20:28])
            except InvalidTag:
                return eng._fail(_AUTH_FAILED), b""
            # EspEngine._after_icv, inlined: move the window, check the trailer, drop a dummy packet. Only
            # authenticated packets move the window; without one (size 0) accept() has nothing to do for a
            # number at or below the top.
            if (window.size or seq > window.top) and not window.accept(seq):
                return eng._fail(_REPLAY), b""
            n = len(plain)  # >= 4: total >= 56 leaves 4 bytes between IV and ICV
            padlen = plain[-2]
            payload_len = n - 2 - padlen
            if payload_len < 0 or (padlen and plain[payload_len:n - 2] != PAD_BYTES[:padlen]):
                return eng._fail(_BAD_SYNTAX), b""  # RFC 4303 §2.4: padding must be 1, 2, 3, ...
            nh = plain[-1]
            if nh == IPPROTO_NONE:  # RFC 4303 §2.6: dummy packet, discard silently
                eng.stats.dummy_packets += 1
                eng._count(0)
                return _DUMMY, b""
            out_total = 20 + payload_len
            csum = -(vt + out_total + idf + (ttl << 8 | nh) + src + dst) % 0xFFFF
            if limited:
                eng._count(out_total)
            else:
                st = eng.stats
                st.packets += 1
                st.bytes += out_total
            return _OK, _V4_FIELDS_PACK(vt, out_total, idf, ttl, nh, csum, src, dst) + plain[:payload_len]
    return eng._general_decapsulate(ip_packet)


# ---------------------------------------------------------------------------------------------------
# AES-CBC + HMAC (RFC 3602, RFC 4868 / RFC 2404), transport, option-less IPv4, no ESN, no UDP-ESP: the
# shape of FastV4CbcEngine. The transform's persistent CBC contexts and pre-keyed HMAC are used exactly as
# CbcHmacTransform.seal / open use them (same IV generator, same chaining fix-up), so the output and the
# transform's state after each packet are those of the general code.

# ESP adds 44 - 20 header bytes, at most 17 trailer bytes and the ICV (HMAC-SHA-512-256: 32) to the packet
_V4_CBC_FAST_MAX = 0xFFFF - 24 - 17 - 32
_V4_ESP_HEAD_PACK = _V4_ESP_HEAD.pack
_V4_ESP_HEAD_UNPACK_FROM = _V4_ESP_HEAD.unpack_from
_from_bytes = int.from_bytes
_compare_digest = _hmac_compare_digest


def encapsulate_v4_cbc(eng: Any, ip_packet: bytes, *, iv: bytes | None = None) -> tuple[Verdict, bytes]:
    limited = eng._limited
    if limited and eng._over_hard_limit():
        return _HARD_LIMIT, b""
    n = len(ip_packet)
    if n >= 20 and ip_packet[0] == 0x45 and iv is None and eng._v4_encrypt is not None:
        vt, total, idf, ttl, nh, _, src, dst = _V4_FIELDS_UNPACK_FROM(ip_packet)
        seq = eng._seq + 1
        if (20 <= total <= n and total <= _V4_CBC_FAST_MAX and not idf & 0x3FFF
                and (seq < eng._seq_warn or seq <= eng._seq_limit)):
            if seq >= eng._seq_warn:
                eng.seq_nearly_exhausted = True
            tr = eng.transform
            # RFC 4303 §2.4: payload, padding 1, 2, 3, ..., pad length, next header, to the 16-byte block
            plaintext = ip_packet[20:total] + eng._trailers[nh][(total - 20) & 15]
            # CbcHmacTransform.next_iv and .seal, inlined (RFC 3602 §3: unpredictable IV per packet)
            counter = tr._iv_counter + 1
            tr._iv_counter = counter
            iv_block = tr._ivgen.update(counter.to_bytes(16, "big"))
            first = _from_bytes(plaintext[:16], "big") ^ _from_bytes(iv_block, "big") ^ tr._enc_chain
            ciphertext = tr._enc.update(first.to_bytes(16, "big") + plaintext[16:])
            tr._enc_chain = _from_bytes(ciphertext[-16:], "big")
            out_total = 44 + len(ciphertext) + eng._icv_len
            csum = -(vt + out_total + idf + (ttl << 8 | IPPROTO_ESP) + src + dst) % 0xFFFF
            head = _V4_ESP_HEAD_PACK(vt, out_total, idf, ttl, IPPROTO_ESP, csum, src, dst, eng.spi, seq) + iv_block
            mac = tr._mac.copy()
            mac.update(head[20:])  # RFC 4303 §3.3.4: the ICV covers SPI, Seq, IV and ciphertext
            mac.update(ciphertext)
            eng._seq = seq
            if limited:
                eng._count(total)
            else:
                st = eng.stats
                st.packets += 1
                st.bytes += total
            return _OK, b"".join((head, ciphertext, mac.finalize()[:eng._icv_len]))
    return eng._general_encapsulate(ip_packet, iv=iv)


def decapsulate_v4_cbc(eng: Any, ip_packet: bytes) -> tuple[Verdict, bytes]:
    limited = eng._limited
    if limited and eng._over_hard_limit():
        return _HARD_LIMIT, b""
    n = len(ip_packet)
    if n >= 44 and ip_packet[0] == 0x45 and eng._v4_decrypt is not None:
        vt, total, idf, ttl, proto, _, src, dst, spi, seq_lo = _V4_ESP_HEAD_UNPACK_FROM(ip_packet)
        icv_len = eng._icv_len
        ct_end = total - icv_len
        # the general code's checks, all passing: unfragmented ESP of this SA, IV + at least one block +
        # ICV (_min_body), whole blocks (_block)
        if (proto == IPPROTO_ESP and not idf & _IP_MF_OFFSET_MASK and total <= n and spi == eng.spi
                and ct_end >= 60 and not (ct_end - 44) & 15):
            window = eng.window
            seq = seq_lo if seq_lo > window.top else window.check(seq_lo)  # RFC 4303 §3.4.3 early reject
            if seq == REJECT:
                return eng._fail(_REPLAY), b""
            tr = eng.transform
            mac = tr._mac.copy()
            mac.update(ip_packet[20:ct_end])  # SPI, Seq, IV, ciphertext; verified before decrypting
            if not _compare_digest(mac.finalize()[:icv_len], ip_packet[ct_end:total]):
                return eng._fail(_AUTH_FAILED), b""
            ciphertext = ip_packet[44:ct_end]
            out = tr._dec.update(ciphertext)
            first = (_from_bytes(out[:16], "big") ^ tr._dec_chain ^ _from_bytes(ip_packet[28:44], "big")).to_bytes(16, "big")
            tr._dec_chain = _from_bytes(ciphertext[-16:], "big")
            if (window.size or seq > window.top) and not window.accept(seq):  # EspEngine._after_icv, inlined
                return eng._fail(_REPLAY), b""
            k = len(out)
            # the first block is fixed up separately (no copy of the whole payload) unless the trailer or
            # its padding reaches into it
            joined = k == 16 or out[-2] > k - 18
            if joined:
                out = first + out[16:]
            padlen = out[-2]
            payload_len = k - 2 - padlen
            if payload_len < 0 or (padlen and out[payload_len:k - 2] != PAD_BYTES[:padlen]):
                return eng._fail(_BAD_SYNTAX), b""
            nh = out[-1]
            if nh == IPPROTO_NONE:
                eng.stats.dummy_packets += 1
                eng._count(0)
                return _DUMMY, b""
            out_total = 20 + payload_len
            csum = -(vt + out_total + idf + (ttl << 8 | nh) + src + dst) % 0xFFFF
            if limited:
                eng._count(out_total)
            else:
                st = eng.stats
                st.packets += 1
                st.bytes += out_total
            head = _V4_FIELDS_PACK(vt, out_total, idf, ttl, nh, csum, src, dst)
            if joined:
                return _OK, head + out[:payload_len]
            return _OK, b"".join((head, first, out[16:payload_len]))
    return eng._general_decapsulate(ip_packet)
