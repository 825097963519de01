"""The kernel-driver packets/s bench end to end (ipsec_nic/bench/kernel_pps.py): the card's wire ends in the
host-side sink, which counts a datagram only once it has checked it. Under crypto offload, packet offload
(the card builds the ESP packet itself) and software XFRM the frames must decrypt with the bench's keys;
with other keys in the sink, none may count. One boot.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ipsec_nic.bench.kernel_pps import MODES, check_slice, kernel_bed, run_slice, sink_flow

pytestmark = pytest.mark.vm

SECONDS = 1.0


def test_every_counted_datagram_was_checked_and_other_keys_count_none(toolchain, tmp_path: Path):
    with kernel_bed(lambda line: print(line, flush=True), tmp_path) as bed:
        for mode in MODES:
            s = run_slice(bed, mode, SECONDS)
            check_slice(s)
            # Everything the card's wire took reached the sink (it may also hold a stray IPv6 frame or two).
            assert s.wire_frames >= s.card_wire_tx >= s.received > 0, s
            assert s.sent >= s.received and s.seq_gaps == 0, s
            # The card's firmware sealed each frame in the mode's own kind of offload, and none otherwise.
            assert (s.fw_crypto >= s.received) == (mode == "offload") and (s.fw_crypto == 0) == (mode != "offload")
            assert (s.fw_packet >= s.received) == (mode == "packet") and (s.fw_packet == 0) == (mode != "packet")
            if mode in ("offload", "packet"):
                assert s.card_offloaded >= s.received
        # The sink now expects other keys: the card's ESP does not authenticate, nothing counts, the slice fails.
        flow = sink_flow(bed.sas, bed.sink_addr)
        assert flow.esp is not None
        bed.sink.expect(dataclasses.replace(flow, esp=dataclasses.replace(flow.esp, key=bytes(16))))
        for mode in ("offload", "packet"):
            s = run_slice(bed, mode, SECONDS)
            assert s.received == 0 and s.refused >= s.card_offloaded > 0, s
            assert "does not authenticate" in s.refusals
            with pytest.raises(RuntimeError, match="refused"):
                check_slice(s)
        bed.sink.expect(flow)
