"""perceiver-serve: the HTTP service in front of perceiver_core."""

import os

from .memory import share_one_arena

# PROMETHEUS_MULTIPROC_DIR is this server's own: its supervisor makes the folder for its processes and names it in
# PERCEIVER_METRICS_DIR too. One inherited from the environment (base images made for gunicorn set it) turned a
# one-process server's metrics into files summed with older processes' samples, or crashed it at start when the
# folder was missing (audit): dropped here, before prometheus_client reads it as it is imported (app.cli warns).
DROPPED_METRICS_DIR: str | None = None
_inherited = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _inherited is not None and _inherited != os.environ.get("PERCEIVER_METRICS_DIR"):
    DROPPED_METRICS_DIR = os.environ.pop("PROMETHEUS_MULTIPROC_DIR")

share_one_arena()  # before torch starts its first thread: app/memory.py says why
