"""`IIOT_COMMANDS_SEQUENTIAL`: off by default, read as a boolean, refused with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from iiot.config import load_settings
from iiot.errors import ConfigError


def test_off_by_default_and_read_from_the_environment_or_toml(tmp_path: Path) -> None:
    assert load_settings({}).commands_sequential is False
    assert load_settings({"IIOT_COMMANDS_SEQUENTIAL": "on"}).commands_sequential is True
    assert load_settings({"IIOT_COMMANDS_SEQUENTIAL": "0"}).commands_sequential is False
    config = tmp_path / "iiot.toml"
    config.write_text("commands_sequential = true\n")
    assert load_settings({"IIOT_CONFIG": str(config)}).commands_sequential is True


def test_a_bad_value_names_the_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"IIOT_COMMANDS_SEQUENTIAL": "sometimes"})
    assert "IIOT_COMMANDS_SEQUENTIAL='sometimes'" in str(caught.value)
    assert "expected 1/0" in str(caught.value)
