"""Tether's actor system: the ring, the store, nodes and session actors.

The gateway reaches it only through the placement API (`actors.placement`) and
the session-id rules (`actors.ids`); nothing here imports `gateway`.
"""

from tether import native

native.choose()  # before any compiled module loads
