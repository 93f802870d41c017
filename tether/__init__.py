"""Tether: a session-affinity gateway for stateful MCP servers."""

__version__ = "0.1.0"
