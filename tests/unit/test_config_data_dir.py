"""A settings file's relative `data_dir` means the same directory from anywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from iiot.config import load_settings


def test_relative_data_dir_in_a_file_is_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "etc" / "iiot.toml"
    config.parent.mkdir()
    config.write_text('data_dir = "../var/iiot"\n')
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    settings = load_settings({"IIOT_CONFIG": str(config)})
    assert settings.data_dir.resolve() == (tmp_path / "var" / "iiot").resolve()
    # The environment still wins, taken as given.
    settings = load_settings({"IIOT_CONFIG": str(config), "IIOT_DATA_DIR": "here"})
    assert settings.data_dir == Path("here")
