"""The exceptions asyncstreams raises. Each says what was expected and what was found."""

from __future__ import annotations


class AsyncstreamsError(Exception):
    """Base class of every error asyncstreams raises on purpose."""


class ConfigurationError(AsyncstreamsError, ValueError):
    """Raised when an option, a URL or a handler's signature is not what asyncstreams expects."""


class DecodeError(AsyncstreamsError):
    """Raised when an entry's fields cannot be decoded into what the handler asks for."""


class RedisUnavailableError(AsyncstreamsError):
    """Raised when Redis cannot be reached while the app starts."""


class RedisRefusedError(AsyncstreamsError):
    """Raised when Redis answers but refuses the app as it starts: a failed login, a missing
    ACL permission, or a read-only replica where the primary was expected."""


class NotFoundError(AsyncstreamsError):
    """Raised when a stream, group or consumer an operation names does not exist, or a key
    is not a stream; and by `App.trim` for a stream without groups."""
