"""Transports: link emulation and transfer measurement (the planner never sees sockets)."""
