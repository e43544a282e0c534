"""The front door: what `import asyncstreams` offers, and that the package ships typed."""

from __future__ import annotations

import inspect
import tomllib
from importlib.resources import files
from pathlib import Path

import pytest

import asyncstreams
from asyncstreams import (
    App,
    AsyncstreamsError,
    ConfigurationError,
    DecodeError,
    Message,
    RedisUnavailableError,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", asyncstreams.__all__)
def test_every_name_in_all_resolves(name: str) -> None:
    assert hasattr(asyncstreams, name), f"asyncstreams.__all__ lists {name!r}, which is missing"


def test_all_lists_each_name_once() -> None:
    assert len(set(asyncstreams.__all__)) == len(asyncstreams.__all__)


def test_every_public_attribute_is_listed_in_all() -> None:
    public = {
        name
        for name, value in vars(asyncstreams).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public <= set(asyncstreams.__all__)


def test_app_and_message_come_from_the_top_package() -> None:
    from asyncstreams.app import App as AppInModule
    from asyncstreams.message import Message as MessageInModule

    assert App is AppInModule
    assert Message is MessageInModule
    assert {"App", "Message"} <= set(asyncstreams.__all__)


@pytest.mark.parametrize(
    "error", [ConfigurationError, DecodeError, RedisUnavailableError], ids=lambda e: e.__name__
)
def test_each_error_is_exported_and_derives_from_the_base(error: type[Exception]) -> None:
    assert error.__name__ in asyncstreams.__all__
    assert getattr(asyncstreams, error.__name__) is error
    assert issubclass(error, AsyncstreamsError)


def test_base_error_is_an_exception() -> None:
    assert "AsyncstreamsError" in asyncstreams.__all__
    assert issubclass(AsyncstreamsError, Exception)


def test_py_typed_marker_ships_with_the_package() -> None:
    assert (Path(asyncstreams.__file__).parent / "py.typed").is_file()
    assert files("asyncstreams").joinpath("py.typed").is_file()


def test_version_matches_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert asyncstreams.__version__ == project["version"]
