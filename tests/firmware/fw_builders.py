"""Request builders shared by the SADB/command tests (built from device.contract.ndis layouts)."""

from __future__ import annotations

from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from device.contract import ndis
from device.contract.enums import EncAlg
from device.contract.ndis import AlgoInfoV2, SaV2, V2AddFlags, V2Operation, V2SaFlags

GCM_KEY = bytes.fromhex("00112233445566778899aabbccddeeff")
SALT = bytes.fromhex("cafebabe")
A, B = "192.0.2.1", "192.0.2.2"
MAC = "02:00:00:00:00:01"


def gcm_sa(spi: int, key: bytes = GCM_KEY + SALT, *, icv: int = 16, esn: bool = False, hi: int = 0,
           offset: int = 0) -> SaV2:
    return SaV2(
        flags=V2SaFlags.ESN_SA if esn else 0, operation=V2Operation.ESP, spi=spi,
        encryption_algorithm=AlgoInfoV2(EncAlg.AES_GCM_128, len(key), offset, icv),
        sequence_number_high_order=hi,
    )


def v2_entry(spi: int, *, inbound: bool, src: str = A, dst: str = B, key: bytes = GCM_KEY + SALT,
             enc_id: int = EncAlg.AES_GCM_128, esn: bool = False, hi: int = 0, udp: int = 0) -> ndis.V2AddSa:
    sa = SaV2(flags=V2SaFlags.ESN_SA if esn else 0, operation=V2Operation.ESP, spi=spi,
              encryption_algorithm=AlgoInfoV2(enc_id, len(key), 0, 16), sequence_number_high_order=hi)
    ipv6 = ":" in dst
    flags = (V2AddFlags.INBOUND if inbound else 0) | (V2AddFlags.IPV6 if ipv6 else 0)
    return ndis.V2AddSa(0, 1, flags, ndis.addr16(src), ndis.addr16(dst), udp, (sa, SaV2()), len(key), key)


def add_sa_ex(spi: int, *, inbound: bool, src: str = A, dst: str = B, key: bytes = GCM_KEY + SALT,
              esn: bool = False, hi: int = 0, udp: int = 0) -> bytes:
    e = v2_entry(spi, inbound=inbound, src=src, dst=dst, key=key, esn=esn, hi=hi, udp=udp)
    size = ndis.V2_ADD_SA_EX.size
    return ndis.V2AddSaEx(e.num_ext_hdrs, e.flags, e.src_addr, e.dest_addr, e.udp_esp_encapsulation, e.sec_assoc,
                          len(key), size, key_data=key).pack()


def scapy_gcm(spi: int, key: bytes = GCM_KEY + SALT, **kw) -> SecurityAssociation:
    return SecurityAssociation(ESP, spi=spi, crypt_algo="AES-GCM", crypt_key=key, **kw)


def esp_frame(spi: int, seq: int = 1, *, src: str = A, dst: str = B, payload: bytes = b"ping" * 8,
              sa: SecurityAssociation | None = None, tunnel: bool = False, **kw) -> bytes:
    """An Ethernet frame carrying ESP made by scapy (the independent oracle)."""
    sa = sa or scapy_gcm(spi, **kw)
    if ":" in dst:
        inner = IPv6(src=src, dst=dst) / UDP(sport=1234, dport=5678) / Raw(payload)
    else:
        inner = IP(src=src, dst=dst) / UDP(sport=1234, dport=5678) / Raw(payload)
    esp = sa.encrypt(inner, seq_num=seq)
    return bytes(Ether(src=MAC, dst=MAC) / esp)
