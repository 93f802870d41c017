"""Tether's edge: client transports, MCP rules, routing and the link to actor nodes."""
