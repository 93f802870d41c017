"""The README's configuration table names every setting, so docs and code cannot drift apart."""

from __future__ import annotations

from pathlib import Path

from tether.config import SETTINGS

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_readme_documents_every_setting() -> None:
    for setting in SETTINGS:
        assert f"| `{setting.name}` | `{setting.flag}` | `{setting.env}` |" in README, setting.name


def test_readme_opens_with_the_two_setup_commands() -> None:
    blocks = README.split("```")
    assert "tether up" in blocks[1]
    assert "./scripts/test" in blocks[3]
