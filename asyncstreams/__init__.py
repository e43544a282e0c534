"""asyncstreams: an asyncio microframework for Redis Streams consumers."""

from ._trim import TrimResult
from .app import App
from .deadletter import DeadLetter, DeadLetterEntry
from .errors import (
    AsyncstreamsError,
    ConfigurationError,
    DecodeError,
    NotFoundError,
    RedisRefusedError,
    RedisUnavailableError,
)
from .message import Message
from .middleware import Call, Middleware, Outcome
from .outbox import Outbox
from .partitions import Partitioned

__version__ = "0.1.0"

__all__ = [
    "App",
    "AsyncstreamsError",
    "Call",
    "ConfigurationError",
    "DeadLetter",
    "DeadLetterEntry",
    "DecodeError",
    "Message",
    "Middleware",
    "NotFoundError",
    "Outbox",
    "Outcome",
    "Partitioned",
    "RedisRefusedError",
    "RedisUnavailableError",
    "TrimResult",
    "__version__",
]
