"""Anti-replay window (RFC 4303 §3.4.3) and ESN reconstruction (Appendix A2) against a plain reference
model: the set of accepted numbers plus the right edge."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_model.replay import REJECT, ReplayWindow

WINDOWS = st.sampled_from([32, 64, 100, 128, 1000, 1024, 4096])


class Reference:
    def __init__(self, size: int, top: int = 0) -> None:
        self.size, self.top, self.seen = size, top, set()

    def acceptable(self, seq: int) -> bool:
        if seq <= 0:
            return False
        if seq > self.top:
            return True
        return self.top - seq < self.size and seq not in self.seen

    def accept(self, seq: int) -> None:
        self.seen.add(seq)
        self.top = max(self.top, seq)


@settings(max_examples=300, deadline=None)
@given(size=WINDOWS, steps=st.lists(st.tuples(st.integers(-5000, 300), st.booleans()), max_size=300))
def test_window_matches_reference(size: int, steps: list[tuple[int, bool]]) -> None:
    """Random walk around the right edge; `authentic` False models an ICV failure, which must leave the
    window untouched (§3.4.3: update only after verification)."""
    window, ref = ReplayWindow(size), Reference(size)
    for delta, authentic in steps:
        seq = max(ref.top + delta, 0)
        got = window.check(seq)
        assert (got != REJECT) == ref.acceptable(seq), (seq, ref.top)
        if got != REJECT and authentic:
            assert got == seq
            assert window.accept(seq)
            ref.accept(seq)
        assert window.top == ref.top


@settings(max_examples=200, deadline=None)
@given(size=WINDOWS, start=st.integers(0, (1 << 33)), deltas=st.lists(st.integers(-4200, 5000), max_size=150))
def test_esn_window_matches_reference_across_boundaries(size: int, start: int, deltas: list[int]) -> None:
    """ESN: only the low 32 bits arrive; for numbers within [T - W + 1, T + 2^32 - W] the reconstructed
    value is the true one (Appendix A2.2) and acceptance matches the 64-bit reference."""
    start = max(start, (1 << 32) - 3000) if start & 1 else start  # half the runs start next to 2^32
    window, ref = ReplayWindow(size, esn=True, top=start), Reference(size, top=start)
    for delta in deltas:
        # Left of the window the low half alone is ambiguous: Appendix A2.2 reads it as the next 2^32
        # subspace and leaves the rejection to the ICV check, so the model only covers [T - W + 1, ...).
        seq = ref.top + max(delta, 1 - size)
        if seq <= 0:
            continue
        got = window.check(seq & 0xFFFFFFFF)
        assert (got != REJECT) == ref.acceptable(seq), (hex(seq), hex(ref.top))
        if got != REJECT:
            assert got == seq
            window.accept(seq)
            ref.accept(seq)


@settings(max_examples=500, deadline=None)
@given(size=WINDOWS, top=st.integers(0, (1 << 40)), offset=st.integers(0, (1 << 32) - 1))
def test_esn_reconstruction_range(size: int, top: int, offset: int) -> None:
    """Every number in the 2^32-wide range starting at the window bottom is recovered exactly."""
    window = ReplayWindow(size, esn=True, top=top)
    seq = top - size + 1 + offset
    if seq < 0 or seq >> 32 > 0xFFFFFFFF:
        return
    assert window.reconstruct(seq & 0xFFFFFFFF) == seq


def test_rfc_appendix_a2_cases() -> None:
    # Case A: T = 5:1000, W = 64 -> Bl = 937. Seql >= Bl -> Seqh = Th; Seql < Bl -> Th + 1
    w = ReplayWindow(64, esn=True, top=(5 << 32) | 1000)
    assert w.reconstruct(990) == (5 << 32) | 990
    assert w.reconstruct(5000) == (5 << 32) | 5000
    assert w.reconstruct(100) == (6 << 32) | 100
    # Case B: T = 5:10, W = 64 -> window straddles; Bl = 2^32 - 53
    w = ReplayWindow(64, esn=True, top=(5 << 32) | 10)
    assert w.reconstruct(0xFFFFFFF0) == (4 << 32) | 0xFFFFFFF0
    assert w.reconstruct(3) == (5 << 32) | 3
    assert w.reconstruct(20) == (5 << 32) | 20
    # Th = 0 in case B: a "previous subspace" number does not exist
    assert ReplayWindow(64, esn=True, top=10).reconstruct(0xFFFFFFF0) == REJECT


def test_large_jump_clears_window_and_bounds() -> None:
    w = ReplayWindow(4096)
    for seq in range(1, 5000):
        assert w.check(seq) == seq and w.accept(seq)
    assert w.check(4999) == REJECT and w.check(904) == REJECT  # duplicate / left of the window
    assert w.check(903 + 1) == REJECT and w.check(905) == REJECT
    w.accept(10_000_000)
    assert w.check(10_000_000 - 4095) == 10_000_000 - 4095
    assert w.check(10_000_000 - 4096) == REJECT
    assert not w.seen(4999)


def test_zero_and_disabled_window() -> None:
    w = ReplayWindow(64)
    assert w.check(0) == REJECT  # RFC 4303 §3.3.3: 0 is never sent
    off = ReplayWindow(0)
    assert off.check(5) == 5 and off.accept(5)
    assert off.check(5) == 5  # replay checking disabled
