"""Load tests that check correctness as well as speed, against any MCP endpoint."""
