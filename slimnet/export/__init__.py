"""``slimnet.export``: the short import path of ``slimnet.deploy.export``, where the code lives (``python -m slimnet.export`` runs ``__main__.py`` here)."""

from slimnet.deploy.export import *
from slimnet.deploy.export import main  # noqa: F401  (named, for readers and linters)
