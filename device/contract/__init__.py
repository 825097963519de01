"""The card's programming interface: everything a driver needs and nothing of the card's model.

regs.py (BAR0 registers, bit fields, descriptor layouts), ndis.py (admin commands), status.py (NDIS
status, CryptoStatus), enums.py (shared enums), layout.py (the one record framework), algorithms.py
(algorithm sizes), sa.py (SaParams, its one validation, and the SA encoder/decoder).

Standard library only, and nothing else of the repository: the guest imports this package on its own
python3 from a read-only share (tests/contract/test_architecture.py checks both).
"""
