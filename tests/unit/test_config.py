from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tether.config import SETTINGS, Config, load, read_toml
from tether.errors import ConfigError


def test_defaults() -> None:
    config = load("up")
    assert (config.host, config.port, config.nodes, config.idle_timeout) == ("127.0.0.1", 8080, 2, 600.0)


def test_flags_beat_environment_beat_file() -> None:
    toml = {"idle_timeout": 30, "port": 9000, "nodes": 3}
    env = {"TETHER_IDLE_TIMEOUT": "20", "TETHER_PORT": "9001"}
    config = load("up", toml=toml, env=env, flags={"idle_timeout": "10"})
    assert (config.idle_timeout, config.port, config.nodes) == (10.0, 9001, 3)


def test_lists_from_file_and_environment() -> None:
    assert load("up", toml={"allowed_origins": ["https://app.example"]}).allowed_origins == (
        "https://app.example",)
    env = {"TETHER_ALLOWED_ORIGINS": "https://a.example, https://b.example"}
    assert load("up", env=env).allowed_origins == ("https://a.example", "https://b.example")


@pytest.mark.parametrize("source, expected", [
    ({"flags": {"idle_timeout": "soon"}}, "idle_timeout (from --idle-timeout): got 'soon', expected a number"),
    ({"env": {"TETHER_PORT": "eighty"}}, "port (from TETHER_PORT): got 'eighty', expected a whole number"),
    ({"toml": {"nodes": 0}}, "nodes (from config file): got 0, expected a value >= 1"),
    ({"toml": {"response_mode": "xml"}}, "expected one of auto, sse, json"),
    ({"toml": {"idle_timout": 5}}, "idle_timout (from config file): no such setting"),
    ({"flags": {"upstream_command": "python 'unclosed"}}, "expected a shell-quoted command line"),
    ({"toml": {"idle_timeout": float("nan")}}, "expected a number of seconds"),
])
def test_bad_values_name_key_value_and_expectation(source: dict[str, dict[str, object]], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load("up", **source)  # type: ignore[arg-type]
    assert expected in info.value.message


def test_every_setting_has_a_default_a_flag_and_a_variable() -> None:
    defaults = Config()
    for setting in SETTINGS:
        assert hasattr(defaults, setting.name)
        assert setting.flag == "--" + setting.name.replace("_", "-")
        assert setting.env == "TETHER_" + setting.name.upper()


def test_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "tether.toml"
    path.write_text('[tether]\nidle_timeout = 42\nupstream_command = "uvx mcp-server-time"\n')
    config = load("up", toml=read_toml(path))
    assert config.idle_timeout == 42.0
    assert config.upstream_command_argv() == ["uvx", "mcp-server-time"]
    path.write_text("idle_timeout = [")
    with pytest.raises(ConfigError, match="Cannot read config file"):
        read_toml(path)
    with pytest.raises(ConfigError, match="does not exist"):
        read_toml(tmp_path / "missing.toml")


def test_bad_value_stops_start_up_with_a_clear_message() -> None:
    result = subprocess.run([sys.executable, "-m", "tether", "up", "--idle-timeout", "-5"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "idle_timeout (from --idle-timeout): got '-5', expected a value >= 0.05" in result.stderr


def test_missing_upstream_program_stops_start_up() -> None:
    result = subprocess.run([sys.executable, "-m", "tether", "up", "--upstream-command", "/no/such/server --x"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "upstream_command: got '/no/such/server --x'" in result.stderr
    assert "is an executable file or on PATH" in result.stderr


def test_help_lists_every_flag_with_its_variable() -> None:
    result = subprocess.run([sys.executable, "-m", "tether", "up", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    for flag in ("--port", "--nodes", "--upstream-command", "--idle-timeout", "--config", "TETHER_PORT"):
        assert flag in result.stdout


def test_port_in_use_stops_start_up_with_a_clear_message() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "tether", "up", "--port", str(port)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"Cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr


def test_affinity_key_is_checked_at_start() -> None:
    assert load("gateway", flags={"affinity_key": "header:X-Workspace"}).affinity_key == "header:X-Workspace"
    with pytest.raises(ConfigError, match="Cannot use affinity_key: expected header:NAME"):
        load("gateway", flags={"affinity_key": "workspace"})
