"""UDP-encapsulated ESP (RFC 3948) and extended sequence numbers across 2^32 (RFC 4304) against Linux XFRM.

NAT-T: both ends use `encap espinudp 4500 4500`; the peer decapsulates on a UDP_ENCAP_ESPINUDP socket.
ESN: both SAs start at 0xfffffff0 and 32 packets cross the 2^32 boundary in each direction. With crypto
offload the driver pushes the new high half to the card with UPDATE_SA when its counter wraps (NDIS v2),
and the card's receive side follows the peer's wrap; with packet offload the card numbers and infers
the high half itself. Linux's ESN state must end at seq-hi 1 on both SAs.
"""

from __future__ import annotations

import pytest

from guest_tools.scenario import SPI_IN, SPI_OUT

from .fixtures_interop import CBC, GCM, check, run_spec

pytestmark = pytest.mark.vm

ESN_START = 0xFFFF_FFF0


@pytest.mark.parametrize(("family", "mode", "offload"), [
    (4, "transport", "crypto"), (6, "transport", "crypto"), (4, "tunnel", "packet"), (6, "tunnel", "packet"),
])
def test_udp_encapsulated_esp_interoperates(interop, family, mode, offload):
    spec, result = run_spec(interop, name=f"natt-v{family}-{mode}-{offload}", family=family, mode=mode,
                            offload=offload, encap=True)
    check(spec, result)
    assert all(sa["flags"] & 0x02 for sa in result["card_sas"])  # SaListFlags.UDP_ENCAP


@pytest.mark.parametrize(("family", "mode", "alg", "offload"), [
    (4, "transport", GCM, "crypto"),
    (6, "tunnel", CBC, "crypto"),
    (4, "transport", CBC, "packet"),
    (6, "transport", GCM, "packet"),
])
def test_esn_crosses_2_to_the_32(interop, family, mode, alg, offload):
    spec, result = run_spec(interop, name=f"esn-v{family}-{mode}-{offload}", family=family, mode=mode, alg=alg,
                            offload=offload, esn=True, seq=ESN_START, count=32)
    check(spec, result)
    assert all(sa["flags"] & 0x01 for sa in result["card_sas"])  # SaListFlags.ESN
    out_state = next(s for s in result["peer_states"] if s["spi"] == SPI_OUT + spec.spi_base)
    in_state = next(s for s in result["peer_states"] if s["spi"] == SPI_IN + spec.spi_base)
    assert (out_state["seq_hi"], out_state["seq"]) == (1, 0x10)  # 0xfffffff1 ... 0x1_00000010 received
    assert (in_state["oseq_hi"], in_state["oseq"]) == (1, 0x10)  # and sent by the peer
    if offload == "crypto":
        assert result["esn_hi_pushed"] == 1  # UPDATE_SA carried the new high half to the card
        assert result["next_seq"] == ESN_START + 32 + 1


def test_esn_with_udp_encapsulation(interop):
    spec, result = run_spec(interop, name="esn-natt-v4", encap=True, esn=True, seq=ESN_START, count=24)
    check(spec, result)


def test_v1_udp_esp_sa_interoperates(interop):
    """ADD_UDPESP_SA (NDIS v1, what a v1 driver programs for NAT-T) with the v1 algorithms, both ways."""
    spec, result = run_spec(interop, name="natt-v4-v1", encap=True, v1=True, alg="3des-cbc+hmac-sha1-96")
    check(spec, result)
    assert all(sa["flags"] & 0x02 for sa in result["card_sas"])  # SaListFlags.UDP_ENCAP
