"""Every error thinair raises on purpose, under one base class.

:class:`ThinairError` carries a ``permanent`` flag: True means no retry can fix it (bad params, missing inputs, an
unusable dataset or model, a diverged loss), so Prefect's retry policy (thinair/orchestration.py) gives up at once
and the CLI (thinair/cli.py) prints the message and exits 1 (:class:`ParamsError`: exit 2). Each class also keeps the
built-in base it had before (ValueError, FileNotFoundError, ...), so callers that catch those still work.
Reads and writes nothing.
"""
from __future__ import annotations


class ThinairError(Exception):
    """A failure thinair explains in words: the message names the problem and the fix."""

    permanent = True  # no retry fixes it
    exit_code = 1


class ParamsError(ThinairError, ValueError):
    """A params file or override is invalid: the message names every bad key."""

    exit_code = 2


class StageInputMissing(ThinairError, FileNotFoundError):
    """An upstream stage's output is missing; the message names the stage to run."""


class DatasetUnavailable(ThinairError, RuntimeError):
    """The dataset cannot be loaded here; the message says how to make it available."""


class GeneratorUnavailable(ThinairError, RuntimeError):
    """The generator (a diffusers Stable Diffusion directory or hub id) cannot be loaded; the message says why."""


class GeneratorMisfit(ThinairError, RuntimeError):
    """The generator cannot represent this dataset (encode.fit_check: fail); the message gives figures and fix."""


class FeaturesUnavailable(ThinairError, RuntimeError):
    """The metric feature extractor cannot be built here; the message says what to install or place where."""


class RunnerUnavailable(ThinairError, RuntimeError):
    """The chosen task runner's package is not installed; the message says what to install."""


class NonFiniteLoss(ThinairError, FloatingPointError):
    """A training loss became NaN/inf; the message names the unit, the step and what to lower."""


class ExportFailed(ThinairError, RuntimeError):
    """`thinair export` cannot write its folder or push it; the message says why and what was kept."""


class WorkspaceBusy(ThinairError, RuntimeError):
    """Another thinair run holds this workspace's lock; the message names it."""


# Built-in errors that no retry fixes either: bad values, types or keys, and missing files.
PERMANENT_BUILTINS = (ValueError, TypeError, KeyError, FileNotFoundError)


def is_permanent(err: BaseException) -> bool:
    """True if retrying cannot help: a ThinairError with ``permanent`` set, or a permanent built-in error."""
    if isinstance(err, ThinairError):
        return err.permanent
    return isinstance(err, PERMANENT_BUILTINS)
