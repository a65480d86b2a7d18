"""Data modules (a package since the split of ``slimnet/data.py``; every old import path still works)."""

from slimnet.data.base import *  # noqa: F401,F403
from slimnet.data.base import _BaseDataModule  # noqa: F401
