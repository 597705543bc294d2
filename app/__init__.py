"""perceiver-serve: the HTTP service in front of perceiver_core."""

from .memory import share_one_arena

share_one_arena()  # before torch starts its first thread: app/memory.py says why
