"""deploylab: the helper package of the course (see README.md and docs/ARCHITECTURE.md)."""

from .config import banner, get_profile

__all__ = ["banner", "get_profile"]
__version__ = "0.1.0"
