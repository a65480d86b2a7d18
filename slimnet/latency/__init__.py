"""``slimnet.latency``, the old import path of ``slimnet.deploy.latency`` (the code lives there).

A package rather than a one-line ``slimnet/latency.py`` for the same reason as ``slimnet.export``: with
the old file gone, git sees the move as a rename and merges other branches' changes into the new file.
"""

from slimnet.deploy.latency import *
from slimnet.deploy.latency import _BACKEND_FNS  # noqa: F401  (tests swap a backend in this dict)
