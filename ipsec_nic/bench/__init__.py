"""`ipsec-nic bench`: every performance figure in one run, each against a reference measured in the same
run (see runner.py). Standard library only at this level: guest_loop.py runs on the guest's python3."""
