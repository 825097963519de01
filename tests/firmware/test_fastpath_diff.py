"""The engine's straight-line IPv4 AES-GCM fast paths must behave exactly like its general code:
same verdicts, bytes, in-place frames, counters, sequence numbers and replay windows, on random and
mutated traffic (see fastpath_diff.py; run it directly for longer runs)."""

from __future__ import annotations

import pytest

from .fastpath_diff import compare


@pytest.mark.parametrize("seed", [1, 2])
def test_fast_and_general_paths_agree(seed):
    checked, seen = compare(2000, seed)
    assert checked == 2000 // 500 * 500 * 4
    # The mutations reach the interesting outcomes, so the agreement means something.
    for outcome in [("encap", "OK"), ("decap", "OK"), ("decap", "AUTH_FAILED"), ("decap", "REPLAY"),
                    ("decap", "BAD_SYNTAX"), ("crypto_encrypt", "OK"), ("crypto_decrypt", "OK"),
                    ("crypto_decrypt", "AUTH_FAILED")]:
        assert seen[outcome] > 0, f"no {outcome} in {dict(seen)}"
