"""The card against the guest kernel's XFRM: transport/tunnel, IPv4/IPv6, AES-GCM and AES-CBC+HMAC-SHA-256,
crypto offload (the driver builds ESP, the card encrypts/verifies) and packet offload (the card does it all).

Each test sends datagrams both ways and checks what the *other* side decrypted: the Linux peer's sockets
get the card's datagrams byte for byte, the card's RX indicates the peer's with CryptoStatus SUCCESS and
the right payload, and no error counter moves on either side (/proc/net/xfrm_stat, `ip -s xfrm state`,
the card's statistics registers and per-SA counters).
"""

from __future__ import annotations

import pytest

from guest_tools.scenario import SPI_IN, SPI_OUT
from ipsec_nic.topology import interop_failures

from .fixtures_interop import CBC, GCM, check, run_spec

pytestmark = pytest.mark.vm


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", ["transport", "tunnel"])
@pytest.mark.parametrize("alg", [GCM, CBC])
def test_crypto_offload_interoperates_with_linux(interop, family, mode, alg):
    spec, result = run_spec(interop, name=f"crypto-v{family}-{mode}-{alg[:7]}", family=family, mode=mode, alg=alg)
    check(spec, result)
    sas = {sa["spi"]: sa for sa in result["card_sas"]}
    assert sas[SPI_OUT + spec.spi_base]["direction"] == "out" and sas[SPI_IN + spec.spi_base]["direction"] == "in"
    # NDIS v2 crypto-offload SAs carry no mode (the host frames tunnel or transport itself): only the family.
    assert {sa["family"] for sa in sas.values()} == {family}


@pytest.mark.parametrize(("family", "mode", "alg"), [
    (4, "transport", GCM), (6, "transport", CBC), (4, "tunnel", CBC), (6, "tunnel", GCM),
])
def test_packet_offload_interoperates_with_linux(interop, family, mode, alg):
    spec, result = run_spec(interop, name=f"packet-v{family}-{mode}-{alg[:7]}", family=family, mode=mode, alg=alg,
                            offload="packet")
    check(spec, result)
    assert all(sa["flags"] & 0x04 for sa in result["card_sas"])  # SaListFlags.PACKET_OFFLOAD
    # The card numbered the packets itself: the peer's receive window ends at the count.
    state = next(s for s in result["peer_states"] if s["spi"] == SPI_OUT + spec.spi_base)
    assert state["seq"] == spec.count


def test_mismatched_keys_are_caught_on_both_sides(interop):
    """The checks bite: with other keys on the peer, nothing decrypts and both sides count it."""
    spec, result = run_spec(interop, name="wrong-keys", peer_keys="different", count=4, timeout=3.0)
    failures = interop_failures(spec, result)
    assert failures
    assert result["card_to_peer"]["received"] == 0
    assert result["xfrm_stat_delta"].get("XfrmInStateProtoError") == spec.count  # ICV failures at the peer
    assert result["peer_to_card"]["crypto_status"] == {"TRANSPORT_ESP_AUTH_FAILED": spec.count}
    assert result["peer_to_card"]["received"] == 0
    assert result["card_stats"]["rx_auth_fail"] == spec.count
    assert result["sa_stats"]["inbound"][0]["auth_failures"] == spec.count
