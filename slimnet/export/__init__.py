"""``slimnet.export``, the old import path of ``slimnet.deploy.export`` (the code lives there).

A package rather than a one-line ``slimnet/export.py`` so that ``slimnet/export.py`` is gone from the
tree and git sees its move to ``slimnet/deploy/export.py`` as a rename: changes made to the old file on
another branch then merge into the new one instead of conflicting with a forwarding stub.
``python -m slimnet.export`` runs ``__main__.py`` here.
"""

from slimnet.deploy.export import *
from slimnet.deploy.export import main  # noqa: F401  (named, for readers and linters)
