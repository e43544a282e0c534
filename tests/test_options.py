"""Options are checked when they are made: consumer and app settings, and the Redis URL."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import pytest

from asyncstreams import App, ConfigurationError, Message
from asyncstreams.options import (
    DEFAULT_URL,
    URL_ENV,
    AppOptions,
    ConsumerOptions,
    check_url,
    mask_url,
    options_table,
    resolve_url,
)


async def handle(message: Message) -> None:
    pass


# -- consumer options ------------------------------------------------------------------

# (overrides of a valid ConsumerOptions, words the message must contain)
BAD_CONSUMER_OPTIONS = [
    pytest.param({"streams": ()}, ["stream", "none"], id="no-streams"),
    pytest.param({"streams": ("a", "a")}, ["repeat", "'a'"], id="repeated-stream"),
    pytest.param({"streams": ("a", "")}, ["stream name", "''"], id="empty-stream-name"),
    pytest.param({"group": ""}, ["group", "''"], id="empty-group"),
    pytest.param({"consumer": ""}, ["consumer", "''"], id="empty-consumer"),
    pytest.param({"concurrency": 0}, ["concurrency", "0"], id="concurrency-0"),
    pytest.param({"concurrency": -1}, ["concurrency", "-1"], id="concurrency-negative"),
    pytest.param({"concurrency": True}, ["concurrency", "True"], id="concurrency-bool"),
    pytest.param({"concurrency": 1.5}, ["concurrency", "1.5"], id="concurrency-float"),
    pytest.param({"batch_size": 0}, ["batch_size", "0"], id="batch_size-0"),
    pytest.param(
        {"streams": ("a", "b", "c"), "batch_size": 2},
        ["batch_size (2)", "number of streams (3)", "COUNT 0"],
        id="batch_size-below-streams",
    ),
    pytest.param({"pause_after_failures": 0}, ["pause_after_failures", "0"], id="pause-0"),
    pytest.param({"max_memory_bytes": 0}, ["max_memory_bytes", "0"], id="max_memory-0"),
    pytest.param({"block_ms": 0}, ["block_ms", "0"], id="block_ms-0"),
    pytest.param({"start_id": ">"}, ["start_id", '">"'], id="start_id-gt"),
    pytest.param({"start_id": ""}, ["start_id", "''"], id="start_id-empty"),
]


def consumer_options(**overrides: Any) -> ConsumerOptions:
    settings: dict[str, Any] = {"streams": ("orders",), "group": "billing", **overrides}
    return ConsumerOptions(**settings)


@pytest.mark.parametrize(("overrides", "words"), BAD_CONSUMER_OPTIONS)
def test_bad_consumer_option_is_refused_naming_it(
    overrides: dict[str, Any], words: list[str]
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        consumer_options(**overrides)
    for word in words:
        assert word in str(caught.value)


@pytest.mark.parametrize(("overrides", "words"), BAD_CONSUMER_OPTIONS)
def test_bad_consumer_option_is_refused_by_the_decorator(
    overrides: dict[str, Any], words: list[str]
) -> None:
    settings: dict[str, Any] = {"group": "billing", **overrides}
    streams = settings.pop("streams", "orders")
    app = App()
    with pytest.raises(ConfigurationError) as caught:
        app.consumer(streams, **settings)(handle)
    for word in words:
        assert word in str(caught.value)
    assert app.registrations == ()


def test_decorator_refuses_zero_concurrency() -> None:
    app = App()
    with pytest.raises(ConfigurationError, match=r"concurrency.*0"):

        @app.consumer("s", group="g", concurrency=0)
        async def handler(message: Message) -> None:
            pass


def test_sane_consumer_options_are_kept() -> None:
    options = consumer_options(
        streams=("a", "b"), concurrency=1, batch_size=2, block_ms=1, start_id="$"
    )
    assert options.streams == ("a", "b")
    assert (options.concurrency, options.batch_size, options.block_ms) == (1, 2, 1)
    assert options.start_id == "$"


def test_consumer_options_are_frozen() -> None:
    options = consumer_options()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.concurrency = 2  # type: ignore[misc]


def test_consumer_options_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        ConsumerOptions(("orders",), "billing")  # type: ignore[misc]


# -- app options -----------------------------------------------------------------------

BAD_APP_OPTIONS = [
    pytest.param({"grace_period": -1}, ["grace_period", "-1"], id="grace_period-negative"),
    pytest.param({"grace_period": True}, ["grace_period", "True"], id="grace_period-bool"),
    pytest.param({"grace_period": float("nan")}, ["grace_period", "nan"], id="grace_period-nan"),
    pytest.param({"max_connections": 0}, ["max_connections", "0"], id="max_connections-0"),
    pytest.param({"max_connections": 2.0}, ["max_connections", "2.0"], id="max_connections-f"),
]


@pytest.mark.parametrize(("overrides", "words"), BAD_APP_OPTIONS)
def test_bad_app_option_is_refused_naming_it(overrides: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigurationError) as caught:
        AppOptions(**overrides)
    for word in words:
        assert word in str(caught.value)


@pytest.mark.parametrize(("overrides", "words"), BAD_APP_OPTIONS)
def test_bad_app_option_is_refused_by_app(overrides: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigurationError) as caught:
        App(**overrides)
    for word in words:
        assert word in str(caught.value)


def test_zero_grace_period_is_allowed() -> None:
    assert App(grace_period=0).grace_period == 0


def test_configure_checks_the_grace_period() -> None:
    app = App(grace_period=5)
    app.configure(grace_period=1.5)
    assert app.grace_period == 1.5
    with pytest.raises(ConfigurationError, match="grace_period"):
        app.configure(grace_period=-1)


# -- the Redis URL ---------------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://x", "localhost:6379", "ftp://x", "redis//localhost:6379"])
def test_check_url_rejects_unknown_schemes_naming_the_allowed_ones(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        check_url(url)
    message = str(caught.value)
    for scheme in ("redis://", "rediss://", "unix://"):
        assert scheme in message
    assert url in message


@pytest.mark.parametrize("url", ["", None, 6379])
def test_check_url_rejects_non_strings_and_empty(url: object) -> None:
    with pytest.raises(ConfigurationError, match="non-empty string"):
        check_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost:6379/0",
        "redis://user:pw@example.com:6380/2",
        "rediss://example.com:6380",
        "unix:///tmp/redis.sock",
        "unix:///tmp/redis.sock?db=1",
    ],
)
def test_check_url_accepts_redis_schemes(url: str) -> None:
    assert check_url(url) == url
    assert App(url).url == url


@pytest.mark.parametrize("url", ["redis://[::1", "redis://user:secret@[::1:6379/0"])
def test_malformed_url_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        check_url(url)
    assert "secret" not in str(caught.value)


def test_app_refuses_an_unknown_scheme() -> None:
    with pytest.raises(ConfigurationError, match="ftp://"):
        App("ftp://x")


def test_configure_refuses_an_unknown_scheme() -> None:
    app = App("redis://app:1/0")
    with pytest.raises(ConfigurationError, match="http://"):
        app.configure(url="http://x")
    assert app.url == "redis://app:1/0"


@pytest.fixture
def no_env_url(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(URL_ENV, raising=False)
    return monkeypatch


def test_default_url_without_any_setting(no_env_url: pytest.MonkeyPatch) -> None:
    assert DEFAULT_URL == "redis://localhost:6379/0"
    assert resolve_url(None, None) == "redis://localhost:6379/0"
    assert App().url == "redis://localhost:6379/0"


def test_env_url_beats_the_default(no_env_url: pytest.MonkeyPatch) -> None:
    no_env_url.setenv("ASYNCSTREAMS_URL", "redis://env:1/0")
    assert resolve_url(None, None) == "redis://env:1/0"
    assert App().url == "redis://env:1/0"


def test_empty_env_url_counts_as_unset(no_env_url: pytest.MonkeyPatch) -> None:
    no_env_url.setenv("ASYNCSTREAMS_URL", "")
    assert App().url == DEFAULT_URL


def test_app_url_beats_env(no_env_url: pytest.MonkeyPatch) -> None:
    no_env_url.setenv("ASYNCSTREAMS_URL", "redis://env:1/0")
    assert resolve_url(None, "redis://app:1/0") == "redis://app:1/0"
    assert App("redis://app:1/0").url == "redis://app:1/0"


def test_cli_url_beats_app_url_and_env(no_env_url: pytest.MonkeyPatch) -> None:
    no_env_url.setenv("ASYNCSTREAMS_URL", "redis://env:1/0")
    assert resolve_url("redis://cli:1/0", "redis://app:1/0") == "redis://cli:1/0"
    assert resolve_url("redis://cli:1/0", None) == "redis://cli:1/0"


def test_configure_url_overrides_app_url(no_env_url: pytest.MonkeyPatch) -> None:
    no_env_url.setenv("ASYNCSTREAMS_URL", "redis://env:1/0")
    app = App("redis://app:1/0")
    app.configure(url="redis://cli:1/0")
    assert app.url == "redis://cli:1/0"


def test_bad_env_url_is_refused_when_used(no_env_url: pytest.MonkeyPatch) -> None:
    no_env_url.setenv("ASYNCSTREAMS_URL", "http://env:1/0")
    with pytest.raises(ConfigurationError, match="http://"):
        App().url  # noqa: B018


# -- masking passwords -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://user:secret@h:1/0", "redis://user:***@h:1/0"),
        ("redis://:secret@h:1", "redis://:***@h:1"),
        (
            "rediss://user:secret@h:1/0?ssl_cert_reqs=none",
            "rediss://user:***@h:1/0?ssl_cert_reqs=none",
        ),
        ("redis://user:s%40cr%3At@h:1/0", "redis://user:***@h:1/0"),
        ("redis://user:se@cret@h:1/0", "redis://user:***@h:1/0"),
        ("redis://h:1/0?password=secret&db=2", "redis://h:1/0?password=***&db=2"),
        ("unix:///tmp/s.sock?password=secret", "unix:///tmp/s.sock?password=***"),
    ],
)
def test_mask_url_hides_the_password(url: str, masked: str) -> None:
    assert mask_url(url) == masked


@pytest.mark.parametrize(
    "url", ["redis://localhost:6379/0", "redis://user@h:1/0", "unix:///tmp/s.sock"]
)
def test_mask_url_leaves_a_url_without_password_unchanged(url: str) -> None:
    assert mask_url(url) == url


def test_display_url_hides_the_password() -> None:
    app = App("redis://user:secret@h:1/0")
    assert app.url == "redis://user:secret@h:1/0"
    assert app.display_url == "redis://user:***@h:1/0"


@pytest.mark.parametrize(
    "url",
    [
        "http://user:secret@h:1/0",
        "ftp://:secret@h",
        "http://user:s%40secret@h",
        "http://h:1/?db=0&password=secret",
        "redis//:secret@h:1/0",
    ],
)
def test_bad_scheme_error_never_shows_the_password(url: str) -> None:
    for refuse in (check_url, App, lambda url: App().configure(url=url)):
        with pytest.raises(ConfigurationError) as caught:
            refuse(url)
        assert "secret" not in str(caught.value)


# -- one declaration ---------------------------------------------------------------------


def test_app_consumer_takes_exactly_the_consumer_options() -> None:
    """`@app.consumer`'s signature is ConsumerOptions': names, kinds and defaults."""
    decorator = inspect.signature(App().consumer).parameters
    declared = inspect.signature(ConsumerOptions).parameters
    assert list(decorator) == list(declared)
    for name, parameter in declared.items():
        assert decorator[name].kind == parameter.kind
        assert decorator[name].default == parameter.default


def test_the_readme_options_table_is_made_from_consumer_options() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert options_table() in readme, "README.md: paste asyncstreams.options.options_table()"


def test_a_missing_group_is_a_configuration_error() -> None:
    options: dict[str, Any] = {}
    with pytest.raises(ConfigurationError, match=r"expected group=\.\.\., the consumer group"):
        App().consumer("orders", **options)


def test_options_go_by_name() -> None:
    with pytest.raises(ConfigurationError, match="2 positional arguments"):
        App().consumer("orders", "billing")  # type: ignore[misc]
