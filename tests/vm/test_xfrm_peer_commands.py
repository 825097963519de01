"""The `ip xfrm` batches guest_tools/xfrm_peer.py generates are accepted by real iproute2 and the guest
kernel's XFRM, and read back as configured (ESN position, addresses, both policy directions). Runs in a
scratch network namespace of the interop VM (the host kernel here has no ESP)."""

from __future__ import annotations

import pytest

from device.contract.enums import Direction, Mode
from device.contract.sa import UdpEncap
from guest_tools.xfrm_peer import batch_text, parse_state_stats, peer_commands

from ..guest.test_xfrm_peer import cbc_sa, gcm_sa

pytestmark = pytest.mark.vm


@pytest.mark.parametrize("cipher", ["cbc", "gcm"])
def test_guest_iproute2_accepts_the_generated_states_and_policies(interop, cipher):
    make = gcm_sa if cipher == "gcm" else (lambda d=Direction.OUTBOUND, **kw: cbc_sa(
        **{"direction": d, "spi": 0x1001, "src": "10.0.0.1", "dst": "10.0.0.2", **kw}))
    sas = [make(esn=True, seq=0xFFFF_FFF0, encap=UdpEncap()),
           make(Direction.INBOUND, spi=0x1002, src="10.0.0.2", dst="10.0.0.1"),
           cbc_sa(mode=Mode.TUNNEL, inner_src="fd02::1", inner_dst="fd01::1")]
    batch = batch_text(peer_commands(sas))
    assert "'" not in batch
    script = (f"printf '%s' '{batch}' > /tmp/xfrm-{cipher}.batch && ip netns add chk-{cipher} && "
              f"ip -n chk-{cipher} -batch /tmp/xfrm-{cipher}.batch && ip -n chk-{cipher} -s xfrm state && "
              f"echo @@policies && ip -n chk-{cipher} xfrm policy; rc=$?; ip netns del chk-{cipher}; exit $rc")
    result = interop.guest(script, timeout=60)
    assert result.exit_code == 0, result.output
    state_text, policy_text = result.output.split("@@policies\n")
    states = {s.spi: s for s in parse_state_stats(state_text)}
    assert set(states) == {0x1001, 0x1002, 0x2002}
    assert (states[0x1001].seq_hi, states[0x1001].seq) == (0, 0xFFFF_FFF0)
    assert states[0x2002].src == "fd00::2" and states[0x2002].packets == 0
    assert "dir in" in policy_text and "dir out" in policy_text
