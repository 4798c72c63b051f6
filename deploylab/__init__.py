"""deploylab: the helper package of the course (see README.md and docs/ARCHITECTURE.md)."""

import logging

from .config import banner, get_profile

# torchao (imported by ExecuTorch, lessons 01, 04b, 07) registers an Enum with torch's pytree, and torch 2.14
# logs a deprecation note for torchao's authors on every import: noise in a learner's outputs, not a problem
# of this course. Only that logger, only below ERROR.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

__all__ = ["banner", "get_profile"]
__version__ = "0.1.0"
