"""User errors: mistakes whose message already says what to do, shown on the command line as one line.

A user error is anything the user can fix without reading slimnet's code: a config key, missing or
unreadable data, a model that cannot be traced, a checkpoint from somewhere else. Those raise a
subclass of :class:`UserError` (or one of the built-in kinds in :data:`USER_ERROR_TYPES`); the command
line prints ``error: <message>`` and exits with status 1, and shows the traceback only with
``debug=true``. Anything else is a bug in slimnet and keeps its full traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message names what to change."""


class UnreadableFileError(UserError, ValueError):
    """A file that is not what it should be (truncated, another format, another tool's pickle)."""


class NothingCutError(UserError, ValueError):
    """A ``percent`` or ``target_flops`` cut that removes no channel (every group frozen, outside the
    scope, or at ``min_channels``): raised before anything changes, so the model is left as it was."""


class TraceError(UserError, RuntimeError):
    """The model could not be captured by ``torch.fx``; the message ends with a hint."""


class TargetImportError(UserError, ImportError):
    """A ``_target_`` that cannot be imported; the message says what to make importable."""


class DataNotFoundError(UserError, RuntimeError):
    """A data set that is not where the config says and cannot be downloaded; the message says where to put it."""


class DataError(UserError, ValueError):
    """A data module that cannot serve the run; the message says what to add."""


class LatencyTableError(UserError, ValueError):
    """A latency table that cannot serve this cut (measured elsewhere, for another model, or there is no way
    to measure one); the message says what to do."""


class ConfigError(UserError, ValueError):
    """A run config that cannot work; the message names the key and what to set."""


# Built-in errors slimnet raises with a message that names the fix (a missing file, a NaN loss).
USER_ERROR_TYPES: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, FloatingPointError)


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (cut at ``limit`` characters), or its type's name when
    it has none: what a one-line message quotes from a third-party error."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__
