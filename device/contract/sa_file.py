"""The user's SA file (YAML) -> SaParams, with one-line errors that say where and what (host and guest).

Shape (keys beyond these are refused, so typos do not pass silently)::

    sas:
      - spi: 0x1001
        direction: outbound          # outbound | inbound
        mode: transport              # transport | tunnel
        proto: esp                   # esp (default) | ah
        src: 192.0.2.1               # traffic endpoints (transport: the SA endpoints;
        dst: 192.0.2.2               #   tunnel: the inner selector)
        tunnel: {src: 198.51.100.1, dst: 198.51.100.2}        # tunnel mode only: outer endpoints
        encap: {type: udp, sport: 4500, dport: 4500}           # optional UDP-ESP (RFC 3948)
        aead: {alg: aes-gcm-128, key: 00112233445566778899aabbccddeeff, salt: cafebabe, icv: 16}
        # or: cipher: {alg: aes-cbc-128, key: ...}  integrity: {alg: hmac-sha256-128, key: ...}
        # or: aead: {alg: aes-gmac-128, key: ..., salt: ...}  (ENCR_NULL_AUTH_AES_GMAC, RFC 4543)
        esn: true
        seq: 0xfffffff0
        replay_window: 128
        lifetime: {soft_packets: 0, hard_packets: 0, soft_bytes: 0, hard_bytes: 0}
        ah: {spi: 0x1002, integrity: {alg: hmac-sha256-128, key: ...}}  # ESP-then-AH bundle (guest CLI)
        selector: {proto: udp, sport: 0, dport: 5001}          # inbound: deliver only this traffic

Which of these keys each offload mode honours is device/contract/sa_fields.py; ``load_sa_entries`` with an
offload mode refuses the others, naming file, entry and key.

Key material is hex (``0x`` prefix, ``:`` and spaces allowed) and must be quoted if it could read as
a YAML number. Error messages never quote keys.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device.contract.algorithms import AUTH_BY_NAME, AUTH_INFO, ENC_BY_NAME, ENC_INFO
from device.contract.enums import AuthAlg, Direction, EncAlg, IpProto, Mode
from device.contract.net import IPPROTO_TCP, IPPROTO_UDP
from device.contract.sa import MIN_SPI, SaInvalid, SaParams, UdpEncap, validate_sa
from device.contract.sa_fields import Offload, refusals
from device.contract.yaml_file import read_yaml

_SA_KEYS = {"spi", "direction", "mode", "proto", "src", "dst", "tunnel", "encap", "aead", "cipher", "integrity",
            "esn", "seq", "replay_window", "lifetime", "ah", "selector"}
_SELECTOR_KEYS = ("proto", "sport", "dport")
# Upper-layer protocols a selector may name by name (RFC 4301 §4.4.1.1 "Next Layer Protocol"); any other
# protocol is given by number.
SELECTOR_PROTOS = {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP}
_LIFETIME_KEYS = ("soft_packets", "hard_packets", "soft_bytes", "hard_bytes")


class SaFileError(ValueError):
    """One-line description of what is wrong and where."""


@dataclass(frozen=True)
class SaEntry:
    """One SA of a file, the keys the user actually gave (defaults are not "given") and where it is."""

    params: SaParams
    given: frozenset[str]
    where: str  # "sas[i]"
    ah: SaParams | None = None  # the AH SA of an ESP-then-AH bundle (same direction, mode, endpoints)


def load_sa_file(path: str | Path) -> list[SaParams]:
    """The file's SAs, one SaParams each (no bundles: their AH would have nowhere to go)."""
    try:
        return _singles(load_sa_entries(path))
    except SaFileError as exc:
        raise SaFileError(f"{path}: {exc}") from None


def _singles(entries: list[SaEntry]) -> list[SaParams]:
    for e in entries:
        if e.ah is not None:
            raise SaFileError(f"{e.where}.ah: ESP-then-AH bundles are added by the guest CLI only")
    return [e.params for e in entries]


def load_sa_entries(path: str | Path, offload: Offload | None = None) -> list[SaEntry]:
    """The file's SAs; with ``offload``, refuse (naming file, entry and key) any given field that offload
    mode cannot honour (device/contract/sa_fields.py)."""
    doc = read_yaml(path, "SA file", SaFileError)
    try:
        entries = parse_sa_entries(doc)
        if offload is not None:
            check_honoured(entries, offload)
        return entries
    except SaFileError as exc:
        raise SaFileError(f"{path}: {exc}") from None


def check_honoured(entries: list[SaEntry], offload: Offload) -> None:
    for e in entries:
        for r in refusals(e.params, e.given, offload):
            raise SaFileError(f"{e.where}.{r.key}: {r.message}")


def parse_sa_document(doc: Any) -> list[SaParams]:
    return _singles(parse_sa_entries(doc))


def parse_sa_entries(doc: Any) -> list[SaEntry]:
    if not isinstance(doc, Mapping) or "sas" not in doc:
        raise SaFileError("top level must be a mapping with a 'sas' list")
    extra = set(doc) - {"sas"}
    if extra:
        raise SaFileError(f"unknown top-level key {sorted(extra)[0]!r}")
    sas = doc["sas"]
    if not isinstance(sas, list) or not sas:
        raise SaFileError("'sas' must be a non-empty list")
    out = []
    for i, entry in enumerate(sas):
        where = f"sas[{i}]"
        params = parse_sa(entry, where)
        ah = _bundle_ah(entry["ah"], params, f"{where}.ah") if "ah" in entry else None
        out.append(SaEntry(params, given_keys(entry, params), where, ah))
    return out


def given_keys(entry: Mapping, params: SaParams) -> frozenset[str]:
    """Keys the entry sets to something other than "none": a zero lifetime, replay window or selector asks for
    nothing."""
    given = set(entry)
    if not (params.sel_proto or params.sel_sport or params.sel_dport):
        given.discard("selector")
    if not params.replay_window:
        given.discard("replay_window")
    if not any((params.soft_packets, params.hard_packets, params.soft_bytes, params.hard_bytes)):
        given.discard("lifetime")
    return frozenset(given)


def _bundle_ah(value: Any, esp: SaParams, where: str) -> SaParams:
    """The AH half of an ESP-then-AH bundle (seed 001: "encryption/decryption (ESP) followed by
    authentication (AH)"): its own SPI and integrity algorithm, everything else shared with the ESP SA."""
    if esp.proto != IpProto.ESP:
        raise SaFileError(f"{where}: a bundle's first SA is ESP (proto: esp)")
    if esp.encap is not None:
        raise SaFileError(f"{where}: UDP encapsulation cannot carry AH (RFC 3948 covers ESP only)")
    if not isinstance(value, Mapping) or set(value) != {"spi", "integrity"}:
        raise SaFileError(f"{where}: expected {{spi: N, integrity: {{alg: ..., key: ...}}}}")
    spi = _int(value["spi"], f"{where}.spi")
    if not MIN_SPI <= spi <= 0xFFFF_FFFF:
        raise SaFileError(f"{where}.spi: {spi:#x} outside {MIN_SPI:#x}..0xffffffff")
    _, _, auth_alg, auth_key, icv = _algorithms({"integrity": value["integrity"]}, IpProto.AH, where)
    ah = SaParams(spi=spi, proto=IpProto.AH, direction=esp.direction, mode=esp.mode, src=esp.src, dst=esp.dst,
                  auth_alg=auth_alg, auth_key=auth_key, icv_len=icv, esn=esp.esn, seq=esp.seq,
                  replay_window=esp.replay_window, inner_src=esp.inner_src, inner_dst=esp.inner_dst)
    try:
        validate_sa(ah)
    except SaInvalid as exc:
        raise SaFileError(f"{where}: {exc}") from None
    return ah


def parse_sa(entry: Any, where: str) -> SaParams:
    if not isinstance(entry, Mapping):
        raise SaFileError(f"{where}: expected a mapping")
    for key in entry:
        if key not in _SA_KEYS:
            raise SaFileError(f"{where}: unknown key {key!r}")
    for key in ("spi", "direction", "src", "dst"):
        if key not in entry:
            raise SaFileError(f"{where}: missing {key!r}")
    spi = _int(entry["spi"], f"{where}.spi")
    if spi == 0:
        raise SaFileError(f"{where}.spi: SPI 0 is reserved and never sent (RFC 4303 §2.1)")
    if not MIN_SPI <= spi <= 0xFFFF_FFFF:
        raise SaFileError(f"{where}.spi: {spi:#x} outside {MIN_SPI:#x}..0xffffffff (1..255 are IANA-reserved)")
    direction = _choice(entry["direction"], {"outbound": Direction.OUTBOUND, "inbound": Direction.INBOUND},
                        f"{where}.direction")
    mode = _choice(entry.get("mode", "transport"), {"transport": Mode.TRANSPORT, "tunnel": Mode.TUNNEL},
                   f"{where}.mode")
    proto = _choice(entry.get("proto", "esp"), {"esp": IpProto.ESP, "ah": IpProto.AH}, f"{where}.proto")
    src = _addr(entry["src"], f"{where}.src")
    dst = _addr(entry["dst"], f"{where}.dst")
    inner_src = inner_dst = None
    if mode == Mode.TUNNEL:
        tunnel = entry.get("tunnel")
        if not isinstance(tunnel, Mapping) or "src" not in tunnel or "dst" not in tunnel:
            raise SaFileError(f"{where}.tunnel: tunnel mode needs tunnel: {{src: ..., dst: ...}}")
        if set(tunnel) - {"src", "dst"}:
            raise SaFileError(f"{where}.tunnel: unknown key {sorted(set(tunnel) - {'src', 'dst'})[0]!r}")
        inner_src, inner_dst = src, dst
        src, dst = _addr(tunnel["src"], f"{where}.tunnel.src"), _addr(tunnel["dst"], f"{where}.tunnel.dst")
    elif "tunnel" in entry:
        raise SaFileError(f"{where}.tunnel: only valid with mode: tunnel")
    if ipaddress.ip_address(src).version != ipaddress.ip_address(dst).version:
        raise SaFileError(f"{where}: src and dst are different IP families")

    enc_alg, enc_key, auth_alg, auth_key, icv = _algorithms(entry, proto, where)
    encap = _encap(entry.get("encap"), f"{where}.encap") if "encap" in entry else None
    esn = entry.get("esn", False)
    if not isinstance(esn, bool):
        raise SaFileError(f"{where}.esn: expected true/false")
    seq = _int(entry.get("seq", 0), f"{where}.seq")
    replay = _int(entry.get("replay_window", 64), f"{where}.replay_window")
    life = entry.get("lifetime", {}) or {}
    if not isinstance(life, Mapping) or set(life) - set(_LIFETIME_KEYS):
        raise SaFileError(f"{where}.lifetime: expected a mapping with {', '.join(_LIFETIME_KEYS)}")
    limits = {k: _int(life.get(k, 0), f"{where}.lifetime.{k}") for k in _LIFETIME_KEYS}
    sel = _selector(entry["selector"], f"{where}.selector") if "selector" in entry else {}
    params = SaParams(
        spi=spi, proto=proto, direction=direction, mode=mode, src=src, dst=dst, enc_alg=enc_alg, enc_key=enc_key,
        auth_alg=auth_alg, auth_key=auth_key, icv_len=icv, esn=esn, seq=seq, replay_window=replay, encap=encap,
        inner_src=inner_src, inner_dst=inner_dst, **limits, **sel,
    )
    try:
        validate_sa(params)
    except SaInvalid as exc:
        raise SaFileError(f"{where}: {exc}") from None
    return params


def _algorithms(entry: Mapping, proto: IpProto, where: str) -> tuple[EncAlg, bytes, AuthAlg, bytes, int]:
    aead, cipher, integrity = entry.get("aead"), entry.get("cipher"), entry.get("integrity")
    if aead is not None and (cipher is not None or integrity is not None):
        raise SaFileError(f"{where}: give either aead or cipher/integrity, not both")
    if aead is not None:
        if proto == IpProto.AH:
            raise SaFileError(f"{where}.aead: AH takes integrity only")
        spec = _spec(aead, f"{where}.aead", ("alg", "key", "salt", "icv"))
        name = spec["alg"]
        salt = _hex(spec.get("salt"), f"{where}.aead.salt", required=True)
        if len(salt) != 4:
            raise SaFileError(f"{where}.aead.salt: needs 4 bytes (RFC 4106 §8.1), got {len(salt)}")
        key = _hex(spec.get("key"), f"{where}.aead.key", required=True)
        icv = _int(spec.get("icv", 16), f"{where}.aead.icv")
        if name in ENC_BY_NAME and ENC_INFO[ENC_BY_NAME[name]].kind == "aead":
            alg = ENC_BY_NAME[name]
            _check_len(key, ENC_INFO[alg].key_len, f"{where}.aead.key", name)
            return alg, key + salt, AuthAlg.NONE, b"", icv
        if name in AUTH_BY_NAME and AUTH_INFO[AUTH_BY_NAME[name]].kind == "gmac":
            alg = AUTH_BY_NAME[name]
            _check_len(key, AUTH_INFO[alg].key_len, f"{where}.aead.key", name)
            return EncAlg.NONE, b"", alg, key + salt, icv
        known = sorted(n for n, a in ENC_BY_NAME.items() if ENC_INFO[a].kind == "aead")
        known += sorted(n for n, a in AUTH_BY_NAME.items() if AUTH_INFO[a].kind == "gmac")
        raise SaFileError(f"{where}.aead.alg: unknown algorithm {name!r} (known: {', '.join(known)})")
    enc_alg, enc_key = EncAlg.NONE, b""
    if cipher is not None:
        if proto == IpProto.AH:
            raise SaFileError(f"{where}.cipher: AH takes integrity only")
        spec = _spec(cipher, f"{where}.cipher", ("alg", "key"))
        name = spec["alg"]
        enc_alg = ENC_BY_NAME.get(name)
        if enc_alg is None or ENC_INFO[enc_alg].kind == "aead":
            known = sorted(n for n, a in ENC_BY_NAME.items() if ENC_INFO[a].kind != "aead")
            raise SaFileError(f"{where}.cipher.alg: unknown algorithm {name!r} (known: {', '.join(known)}; "
                              "AES-GCM goes under aead)")
        enc_key = _hex(spec.get("key"), f"{where}.cipher.key", required=ENC_INFO[enc_alg].key_len > 0)
        _check_len(enc_key, ENC_INFO[enc_alg].key_len, f"{where}.cipher.key", name)
    auth_alg, auth_key, icv = AuthAlg.NONE, b"", 16
    if integrity is not None:
        spec = _spec(integrity, f"{where}.integrity", ("alg", "key"))
        name = spec["alg"]
        auth_alg = AUTH_BY_NAME.get(name)
        if auth_alg is None or AUTH_INFO[auth_alg].kind != "hmac":
            known = sorted(n for n, a in AUTH_BY_NAME.items() if AUTH_INFO[a].kind == "hmac")
            raise SaFileError(f"{where}.integrity.alg: unknown algorithm {name!r} (known: {', '.join(known)})")
        auth_key = _hex(spec.get("key"), f"{where}.integrity.key", required=True)
        _check_len(auth_key, AUTH_INFO[auth_alg].key_len, f"{where}.integrity.key", name)
        icv = AUTH_INFO[auth_alg].icv_len
    if cipher is None and integrity is None:
        raise SaFileError(f"{where}: needs aead, or cipher and/or integrity")
    return enc_alg, enc_key, auth_alg, auth_key, icv


def _spec(value: Any, where: str, allowed: tuple[str, ...]) -> Mapping:
    if not isinstance(value, Mapping):
        raise SaFileError(f"{where}: expected a mapping with {', '.join(allowed)}")
    for key in value:
        if key not in allowed:
            raise SaFileError(f"{where}: unknown key {key!r}")
    if not isinstance(value.get("alg"), str):
        raise SaFileError(f"{where}: missing 'alg'")
    return {**value, "alg": value["alg"].lower()}


def _check_len(key: bytes, want: int, where: str, name: str) -> None:
    if len(key) != want:
        raise SaFileError(f"{where}: {name} needs a {want}-byte key, got {len(key)} bytes")


def _hex(value: Any, where: str, required: bool) -> bytes:
    if value is None:
        if required:
            raise SaFileError(f"{where}: missing")
        return b""
    if not isinstance(value, str):
        raise SaFileError(f"{where}: write key material as a quoted hex string")
    text = value.strip().replace(":", "").replace(" ", "")
    if text[:2].lower() == "0x":
        text = text[2:]
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise SaFileError(f"{where}: not a hex string") from None


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str):
            try:
                return int(value, 0)
            except ValueError:
                pass
        raise SaFileError(f"{where}: expected an integer, got {value!r}")
    if value < 0:
        raise SaFileError(f"{where}: must not be negative")
    return value


def _choice(value: Any, options: Mapping[str, Any], where: str):
    if not isinstance(value, str) or value.lower() not in options:
        raise SaFileError(f"{where}: expected one of {', '.join(options)}, got {value!r}")
    return options[value.lower()]


def _addr(value: Any, where: str) -> str:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise SaFileError(f"{where}: {value!r} is not an IP address") from None


def selector_proto(value: Any, where: str) -> int:
    """A selector protocol: tcp, udp or a number 1..255 (0, "any", is what leaving it out means)."""
    if isinstance(value, str) and value.lower() in SELECTOR_PROTOS:
        return SELECTOR_PROTOS[value.lower()]
    proto = _int(value, where) if not isinstance(value, str) or value[:1].isdigit() else -1
    if not 1 <= proto <= 0xFF:
        raise SaFileError(f"{where}: expected tcp, udp or a protocol number 1..255, got {value!r}")
    return proto


def _selector(value: Any, where: str) -> dict[str, int]:
    """``selector: {proto: udp, sport: N, dport: N}`` -> SaParams sel_proto/sel_sport/sel_dport (0 = any).

    The rest of the traffic selector next to the addresses (RFC 4301 §4.4.1.1): the v1 filter's Protocol,
    SrcPort and DestPort, ADD_SA_PACKET's sel_proto/sel_sport/sel_dport. Ports are TCP/UDP ports, so they
    need proto tcp or udp (NDIS OFFLOAD_IPSEC_ADD_SA: "TCP or UDP port")."""
    if not isinstance(value, Mapping) or not value:
        raise SaFileError(f"{where}: expected {{proto: udp, sport: N, dport: N}}")
    extra = set(value) - set(_SELECTOR_KEYS)
    if extra:
        raise SaFileError(f"{where}: unknown key {sorted(extra)[0]!r}")
    out = {"sel_proto": selector_proto(value["proto"], f"{where}.proto") if "proto" in value else 0}
    for key in ("sport", "dport"):
        port = _int(value.get(key, 0), f"{where}.{key}")
        if port > 0xFFFF:
            raise SaFileError(f"{where}.{key}: {port} is not a port")
        out[f"sel_{key}"] = port
    if (out["sel_sport"] or out["sel_dport"]) and out["sel_proto"] not in (IPPROTO_TCP, IPPROTO_UDP):
        raise SaFileError(f"{where}: ports need proto tcp or udp")
    return out


def _encap(value: Any, where: str) -> UdpEncap:
    if not isinstance(value, Mapping):
        raise SaFileError(f"{where}: expected {{type: udp, sport: 4500, dport: 4500}}")
    if set(value) - {"type", "sport", "dport"}:
        raise SaFileError(f"{where}: unknown key {sorted(set(value) - {'type', 'sport', 'dport'})[0]!r}")
    if str(value.get("type", "udp")).lower() != "udp":
        raise SaFileError(f"{where}.type: only 'udp' (RFC 3948) is supported")
    ports = {}
    for key in ("sport", "dport"):
        port = _int(value.get(key, 4500), f"{where}.{key}")
        if not 1 <= port <= 0xFFFF:
            raise SaFileError(f"{where}.{key}: {port} is not a UDP port")
        ports[key] = port
    return UdpEncap(**ports)
