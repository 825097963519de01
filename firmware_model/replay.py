"""Inbound anti-replay window (RFC 4303 §3.4.3) with ESN reconstruction (RFC 4303 Appendix A2).

The bitmap is an RFC 6479 ring: 64-bit buckets in a power-of-two list, one bucket of slack, so moving the
right edge clears whole buckets instead of shifting a long bitmap. A packet is processed in two steps, in
the order RFC 4303 §3.4.3/§3.4.4 require: `check()` before the ICV is verified (cheap early reject, and
infers the 64-bit number), `accept()` only after the ICV verified (the window never moves for forged
packets).
"""

from __future__ import annotations

_BUCKET_BITS = 64
_BUCKET_SHIFT = 6
_BIT_MASK = _BUCKET_BITS - 1
_U32 = 0xFFFF_FFFF
_TWO32 = 1 << 32

REJECT = -1  # check()/reconstruct() result: replayed, too old or not representable


class ReplayWindow:
    """Window of `size` sequence numbers ending at the highest authenticated one (`top`).

    size 0 disables replay checking (RFC 4303 §3.4.3 lets the receiver do so) but `top` is still kept,
    because ESN reconstruction needs it; reconstruction then uses a window of 1.
    """

    __slots__ = ("size", "esn", "top", "_bits", "_ring_mask", "_nbuckets", "_span")

    def __init__(self, size: int, *, esn: bool = False, top: int = 0) -> None:
        if size < 0:
            raise ValueError("replay window size must be >= 0")
        self.size = size
        self.esn = esn
        self.top = top  # highest authenticated sequence number (64-bit with ESN)
        # RFC 6479 §2: one extra bucket so a whole bucket can be cleared while `size` bits stay valid.
        need = (size + _BUCKET_BITS - 1) // _BUCKET_BITS + 1
        nbuckets = 2
        while nbuckets < need:
            nbuckets <<= 1
        self._nbuckets = nbuckets
        self._ring_mask = nbuckets - 1
        self._bits = [0] * nbuckets
        self._span = max(size, 1)  # window used for ESN inference

    # RFC 4303 Appendix A2.2: infer Seqh from the received Seql, the window top T = Th||Tl and W.
    def reconstruct(self, seq_lo: int) -> int:
        if not self.esn:
            return seq_lo
        top = self.top
        th = top >> 32
        tl = top & _U32
        w = self._span
        bl = (tl - w + 1) & _U32
        if tl >= w - 1:  # noqa: SIM108 -- Case A: the window lies within one 2^32 subspace
            seqh = th if seq_lo >= bl else th + 1
        else:  # Case B: the window straddles a subspace boundary
            seqh = th - 1 if seq_lo >= bl else th
        if seqh < 0 or seqh > _U32:
            return REJECT
        return (seqh << 32) | seq_lo

    def check(self, seq_lo: int) -> int:
        """Early check of a received 32-bit number. Returns the full sequence number to use for the ICV,
        or REJECT for a replay / a number left of the window (RFC 4303 §3.4.3)."""
        seq = self.reconstruct(seq_lo) if self.esn else seq_lo  # (saves a call per packet without ESN)
        if seq <= 0:  # REJECT, or 0 which a sender never uses (RFC 4303 §3.3.3: first packet is 1)
            return REJECT
        if self.size == 0 or seq > self.top:
            return seq
        if self.top - seq >= self.size:
            return REJECT
        if (self._bits[(seq >> _BUCKET_SHIFT) & self._ring_mask] >> (seq & _BIT_MASK)) & 1:
            return REJECT
        return seq

    def accept(self, seq: int) -> bool:
        """Record an authenticated number (RFC 4303 §3.4.3: update only after ICV verification).
        Returns False if it turned out to be a replay after all."""
        top = self.top
        bits = self._bits
        mask = self._ring_mask
        if seq > top:
            if self.size:
                index = seq >> _BUCKET_SHIFT
                top_index = top >> _BUCKET_SHIFT
                steps = index - top_index
                if steps >= self._nbuckets:
                    for i in range(self._nbuckets):
                        bits[i] = 0
                else:
                    for i in range(top_index + 1, index + 1):
                        bits[i & mask] = 0
                bits[index & mask] |= 1 << (seq & _BIT_MASK)
            self.top = seq
            return True
        if self.size == 0:
            return True
        if seq <= 0 or top - seq >= self.size:
            return False
        slot = (seq >> _BUCKET_SHIFT) & mask
        bit = 1 << (seq & _BIT_MASK)
        if bits[slot] & bit:
            return False
        bits[slot] |= bit
        return True

    def seen(self, seq: int) -> bool:
        """True if `seq` lies in the window and was accepted (for tests/dumps)."""
        if seq > self.top or self.top - seq >= self.size or seq <= 0:
            return False
        return bool((self._bits[(seq >> _BUCKET_SHIFT) & self._ring_mask] >> (seq & _BIT_MASK)) & 1)
