"""asyncstreams: an asyncio microframework for Redis Streams consumers."""

from .app import App
from .errors import AsyncstreamsError, ConfigurationError, DecodeError, RedisUnavailableError
from .message import Message

__version__ = "0.1.0"

__all__ = [
    "App",
    "AsyncstreamsError",
    "ConfigurationError",
    "DecodeError",
    "Message",
    "RedisUnavailableError",
    "__version__",
]
