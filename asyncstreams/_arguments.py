"""Argument types the command line's subcommands share: each turns a bad value into an
argparse error that says what was expected and what was found."""

from __future__ import annotations

import argparse

from .errors import AsyncstreamsError
from .options import check_url


def url(text: str) -> str:
    """A Redis URL (`redis://`, `rediss://` or `unix://`)."""
    try:
        return check_url(text)
    except AsyncstreamsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {text!r}")
    return value


def http_address(text: str) -> tuple[str | None, int]:
    """`HOST:PORT` to serve HTTP on (`--http`): `127.0.0.1:9000`, `[::1]:9000`, or `:9000`
    for every interface (host None); port 0 picks a free one."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT (e.g. 127.0.0.1:9000, [::1]:9000 or :9000), got {text!r}"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise argparse.ArgumentTypeError(
            f"expected an IPv6 address in brackets (e.g. [::1]:9000), got {text!r}"
        )
    return host or None, int(port)
