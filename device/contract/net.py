"""Ethernet and IP numbers the driver and the card both use (IEEE 802.3 ethertypes, IANA protocol
numbers, RFC 8200 extension headers), declared once."""

from __future__ import annotations

ETH_HLEN = 14  # Ethernet header (IEEE 802.3): a frame may be MTU + ETH_HLEN bytes long (plus one VLAN tag)
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100

IPPROTO_IPV4 = 4  # IP in IP: tunnel-mode inner IPv4
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_IPV6 = 41
IPPROTO_ESP = 50
IPPROTO_AH = 51
IPPROTO_NONE = 59  # RFC 4303 §2.6 dummy packet
IPV6_HOPOPTS = 0
IPV6_ROUTING = 43
IPV6_FRAGMENT = 44
IPV6_DSTOPTS = 60
