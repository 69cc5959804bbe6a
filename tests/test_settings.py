"""Every serve option reads DINOSERVE_<OPTION>; command-line values win."""

from pathlib import Path

import pytest

from service.settings import Settings


def test_defaults_then_environment_then_overrides():
    env = {"DINOSERVE_PORT": "9100", "DINOSERVE_TRITON_URL": "triton:8000", "DINOSERVE_REPOSITORY": "/models"}
    settings = Settings.load({"port": None, "model": "mine"}, environ=env)
    assert settings.port == 9100 and settings.triton_url == "triton:8000"
    assert settings.repository == Path("/models") and settings.model == "mine"
    assert settings.model_dir == Path("/models/mine")
    assert Settings.load({"port": 9000}, environ=env).port == 9000
    assert Settings.load({}, environ={}).port == 8080 and Settings.load({}, environ={}).triton_url is None


def test_malformed_environment_value_names_the_variable():
    with pytest.raises(ValueError, match="DINOSERVE_PORT"):
        Settings.load({}, environ={"DINOSERVE_PORT": "eighty"})
