"""Tether's edge: client transports, MCP rules, routing and the link to actor nodes."""

from tether import native

native.choose()  # before any compiled module loads
