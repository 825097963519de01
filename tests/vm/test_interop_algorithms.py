"""Every ESP algorithm and AH integrity algorithm the card advertises, proven against the guest kernel's XFRM
in both directions (AH: AH-only SAs with each HMAC, and ESP-then-AH bundles; AH-GMAC is refused by the card).

The card (served with device/profiles/legacy-algorithms.yaml: the default profile plus 3DES-CBC and
HMAC-MD5-96, the v1 algorithms an NDIS v1 driver would use) runs each case as an outbound and an inbound
SA; the Linux peer in netns `peer` holds the mirrored states (guest_tools/xfrm_peer.py). Each case sends
datagrams both ways and checks what the *other* side decrypted (ipsec_nic.topology.interop_failures:
digests recomputed on the host, no error counter moved on either side).

All cases of a suite run in ONE guest process (`scenario run-many`), so the matrix costs one Python
start-up, not one per case. The default suite has one row per algorithm (each key size, each GCM ICV
length, each cipher with an HMAC, NULL with each HMAC, 3DES through V1_ADD_SA and V2, packet offload per
family, IPv6 and tunnel repeats). The full key x ICV / cipher x HMAC grid runs on demand:

    ./ipsec-nic test -m matrix tests/vm/test_interop_algorithms.py
"""

from __future__ import annotations

import itertools
import time

import pytest

from device.contract.algorithms import AUTH_INFO
from device.contract.enums import AuthAlg, EncAlg
from device.profile import default_profile_path, load_profile
from firmware_model.capabilities import Capabilities
from guest_tools.scenario import AH_SPI_OFFSET, ALGORITHMS, SPI_IN, SPI_OUT, Spec
from ipsec_nic.topology import interop_failures

from .fixtures_interop import LEGACY_PROFILE, check

COUNT = 4  # datagrams each way per case


def _case(alg: str, *, family: int = 4, mode: str = "transport", offload: str = "crypto", v1: bool = False,
          ah: str = "") -> Spec:
    name = f"{alg}{'+ah-' + ah if ah else ''}-v{family}-{mode}-{offload}" + ("-v1" if v1 else "")
    return Spec(name=name, alg=alg, family=family, mode=mode, offload=offload, v1=v1, count=COUNT, size=120, ah=ah)


DEFAULT_CASES: list[Spec] = [
    # AES-GCM (RFC 4106): every key size and every ICV length, one row each.
    _case("aes-gcm-128-icv8"), _case("aes-gcm-192-icv12"), _case("aes-gcm-256"),
    # AES-GMAC (RFC 4543, ESP integrity only), each key size.
    _case("aes-gmac-128"), _case("aes-gmac-192"), _case("aes-gmac-256", family=6),
    # AES-CBC (RFC 3602) with each HMAC (RFC 2404 SHA1-96, RFC 4868 SHA256-128; RFC 2403 MD5-96 legacy).
    _case("aes-cbc-128+hmac-sha1-96"), _case("aes-cbc-192+hmac-sha256-128"), _case("aes-cbc-256+hmac-sha1-96"),
    _case("aes-cbc-128+hmac-md5-96"),
    # NULL encryption (RFC 4303 §3.2 / RFC 2410): ESP with integrity only.
    _case("null+hmac-sha1-96"), _case("null+hmac-sha256-128"), _case("null+hmac-md5-96"),
    # 3DES-CBC (RFC 2451) and MD5: what a v1 driver programs, through V1_ADD_SA and through V2.
    _case("3des-cbc+hmac-md5-96", v1=True), _case("null+hmac-sha1-96", v1=True),
    _case("3des-cbc+hmac-sha1-96"), _case("3des-cbc+hmac-md5-96", family=6, mode="tunnel"),
    # Packet offload (the card builds ESP itself): one row per family.
    _case("aes-gcm-256-icv12", offload="packet"), _case("aes-gmac-128", offload="packet"),
    _case("aes-cbc-256+hmac-sha1-96", offload="packet", family=6), _case("null+hmac-sha256-128", offload="packet"),
    _case("3des-cbc+hmac-md5-96", offload="packet", mode="tunnel"),
    # AH (RFC 4302; integrity is HMAC only, datasheet §12.1 decision 23): AH-only SAs with each HMAC, and
    # ESP-then-AH bundles (RFC 4301 §4.5), through V2_ADD_SA_EX and V1_ADD_SA.
    _case("none", ah="hmac-sha1-96"), _case("none", ah="hmac-sha256-128", family=6),
    _case("none", ah="hmac-md5-96", v1=True),
    _case("aes-cbc-128+hmac-sha1-96", ah="hmac-sha256-128"), _case("aes-gcm-128", ah="hmac-sha1-96", family=6),
]

FULL_CASES: list[Spec] = [
    *(_case(a) for a in sorted(ALGORITHMS)),
    *(_case(a, v1=True) for a in ("3des-cbc+hmac-md5-96", "3des-cbc+hmac-sha1-96", "null+hmac-md5-96")),
    *(_case(a, family=6, mode="tunnel") for a in ("aes-gcm-256", "aes-cbc-256+hmac-sha256-128")),
]


def _numbered(cases: list[Spec]) -> list[Spec]:
    """Distinct SPIs per case (one peer netns, one card: a leftover from a failed case must not match)."""
    out, base = [], itertools.count(1)
    for spec in cases:
        out.append(Spec(**{**spec.__dict__, "spi_base": 0x100 + next(base) * 16}))
    return out


def _run(interop, cases: list[Spec]) -> dict[str, tuple[Spec, dict]]:
    specs = _numbered(cases)
    assert len({s.name for s in specs}) == len(specs), "case names must be unique"
    t0 = time.monotonic()
    results = interop.run_many(specs)
    print(f"\nalgorithm matrix: {len(specs)} cases in one guest process, {time.monotonic() - t0:.1f} s")
    return {s.name: (s, r) for s, r in zip(specs, results, strict=True)}


@pytest.fixture(scope="module")
def default_matrix(interop):
    return _run(interop, DEFAULT_CASES)


def _assert_case(spec: Spec, result: dict) -> None:
    assert "error" not in result, f"{spec.name}: the guest could not run the case: {result['error']}"
    check(spec, result)
    # The SAs really were what the case names (not silently another algorithm or command).
    assert result["spec"]["alg"] == spec.alg and result["spec"]["v1"] == spec.v1
    if spec.offload == "packet":
        assert all(sa["flags"] & 0x04 for sa in result["card_sas"])  # SaListFlags.PACKET_OFFLOAD
    if spec.ah and spec.alg != "none":
        # A bundle really was ESP then AH on both sides: two SAs per card handle, and the peer's AH states
        # (the ESP SPI + AH_SPI_OFFSET) carried every datagram too.
        assert [len(result["sa_stats"][d]) for d in ("outbound", "inbound")] == [2, 2]
        for spi in (SPI_OUT + spec.spi_base + AH_SPI_OFFSET, SPI_IN + spec.spi_base + AH_SPI_OFFSET):
            assert [s["packets"] for s in result["peer_states"] if s["spi"] == spi] == [spec.count], hex(spi)


@pytest.mark.vm
@pytest.mark.parametrize("name", [s.name for s in DEFAULT_CASES])
def test_algorithm_interoperates_with_linux_both_ways(default_matrix, name):
    spec, result = default_matrix[name]
    _assert_case(spec, result)


@pytest.mark.vm
@pytest.mark.matrix
def test_full_algorithm_grid_interoperates_with_linux(interop):
    """Deselected unless selected: ./ipsec-nic test -m matrix tests/vm/test_interop_algorithms.py"""
    failures = []
    for name, (spec, result) in _run(interop, FULL_CASES).items():
        if "error" in result:
            failures.append(f"{name}: {result['error']}")
        else:
            failures += [f"{name}: {f}" for f in interop_failures(spec, result)]
    assert not failures, "\n".join(failures)


# --- no VM: the matrix covers everything the card advertises for ESP and AH -------------------------


def _advertised(profile_path) -> tuple[set[EncAlg], set[AuthAlg]]:
    caps = Capabilities.from_profile(load_profile(profile_path).firmware)
    return set(caps.encryption), set(caps.integrity)


@pytest.mark.parametrize("profile", ["default", "legacy"])
def test_the_default_suite_proves_every_advertised_esp_and_ah_algorithm(profile):
    from device.contract.enums import IpProto
    from guest_tools.scenario import card_sas, fill_keys, sa_document

    enc, auth = _advertised(default_profile_path() if profile == "default" else LEGACY_PROFILE)
    proven_enc: set[EncAlg] = set()
    proven_auth: set[AuthAlg] = set()
    proven_ah: dict[AuthAlg, set[str]] = {}  # AH integrity -> "alone" / "bundle"
    gcm_icvs: set[int] = set()
    for spec in DEFAULT_CASES:
        first = card_sas(fill_keys(sa_document(spec)))[0]
        esp, ah = first if isinstance(first, tuple) else (first, None)
        if esp.proto == IpProto.AH:
            esp, ah = None, esp
        if ah is not None:
            proven_ah.setdefault(ah.auth_alg, set()).add("alone" if esp is None else "bundle")
        if esp is None:
            continue
        proven_enc.add(esp.enc_alg)
        proven_auth.add(esp.auth_alg)
        if esp.enc_alg in (EncAlg.AES_GCM_128, EncAlg.AES_GCM_192, EncAlg.AES_GCM_256):
            gcm_icvs.add(esp.icv_len)
    assert enc <= proven_enc, f"advertised but not proven: {sorted(a.name for a in enc - proven_enc)}"
    assert auth <= proven_auth | {AuthAlg.NONE}, \
        f"advertised but not proven: {sorted(a.name for a in auth - proven_auth)}"
    # AH takes every advertised HMAC (the GMACs are ESP only): each proven as an AH-only SA, and bundles exist.
    ah_auth = {a for a in auth if AUTH_INFO[a].kind == "hmac"}
    alone = {a for a, how in proven_ah.items() if "alone" in how}
    assert ah_auth and ah_auth <= alone, f"AH integrity advertised but not proven as an AH-only SA: " \
        f"{sorted(a.name for a in ah_auth - alone)}"
    assert any("bundle" in how for how in proven_ah.values()), "no ESP-then-AH bundle in the default suite"
    assert gcm_icvs == {8, 12, 16}  # RFC 4106 §6
    assert {s.offload for s in DEFAULT_CASES} == {"crypto", "packet"} and any(s.v1 for s in DEFAULT_CASES)


def test_legacy_profile_is_the_default_plus_3des_and_md5_only():
    default, legacy = (Capabilities.from_profile(load_profile(p).firmware)
                       for p in (default_profile_path(), LEGACY_PROFILE))
    assert EncAlg.TDES_CBC not in default.encryption and AuthAlg.MD5 not in default.integrity
    assert legacy.encryption == default.encryption | {EncAlg.TDES_CBC}
    assert legacy.integrity == default.integrity | {AuthAlg.MD5}
    assert {k: v for k, v in vars(legacy).items() if k not in ("encryption", "integrity")} == \
        {k: v for k, v in vars(default).items() if k not in ("encryption", "integrity")}
