"""The bundled demo upstream: a stateful MCP server over stdio, written with the official SDK.

One process serves one session, so module state is session state: a counter,
a notes list, and a tool that tells which node and process serve the session.
Installed with the `demo` extra; the gateway itself does not depend on the SDK.
"""
