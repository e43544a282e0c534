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
from .partitions import Partitioned

__version__ = "0.1.0"

__all__ = [
    "App",
    "AsyncstreamsError",
    "ConfigurationError",
    "DeadLetter",
    "DeadLetterEntry",
    "DecodeError",
    "Message",
    "Partitioned",
    "RedisRefusedError",
    "RedisUnavailableError",
    "__version__",
]
