"""``slimnet.latency``: the short import path of ``slimnet.deploy.latency``, where the code lives."""

from slimnet.deploy.latency import *
from slimnet.deploy.latency import _BACKEND_FNS  # noqa: F401  (tests swap a backend in this dict)
