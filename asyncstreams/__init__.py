"""asyncstreams: an asyncio microframework for Redis Streams consumers."""

from .app import App
from .deadletter import DeadLetter, DeadLetterEntry
from .errors import (
    AsyncstreamsError,
    ConfigurationError,
    DecodeError,
    RedisRefusedError,
    RedisUnavailableError,
)
from .message import Message

__version__ = "0.1.0"

__all__ = [
    "App",
    "AsyncstreamsError",
    "ConfigurationError",
    "DeadLetter",
    "DeadLetterEntry",
    "DecodeError",
    "Message",
    "RedisRefusedError",
    "RedisUnavailableError",
    "__version__",
]
