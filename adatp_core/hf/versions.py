"""The transformers releases the pack is tested with, and what it says when the installed one differs
or fails.

- ``MINIMUM`` .. ``NEWEST_TESTED`` (tested on ``TESTED_ON``) is the tested range. The minimum is
  written three times, one for each reader: here, requirements.txt's lower bound (pip, and
  scripts/test_min.sh, which pins it) and pyproject.toml's; test_versions keeps them equal. Every version branch in
  hf/ names, beside it, the releases it serves. The README's "Supported versions" table and
  pyproject.toml's comment write the range out; test_versions checks them against these constants.
- ``tested_range`` and ``standing`` are the words for the range and for where a release stands: the load
  warning, the doctor (its environment block and failure line) and the clear error all use them.
- At model load (``warn_if_untested``), a transformers newer than the newest tested gets one
  warning per process (not a refusal: a new release usually works, and the doctor checks it),
  and one older than the minimum gets one too (the requirements exclude it; it was forced).
- ``transformers_boundary``: where the pack calls transformers during a run (the decoder layers,
  the vision tower, the position ids, building the model), an unexpected error that
  transformers' own code raised becomes an ``AdaTPTransformersError`` naming the model family,
  the installed and tested versions, and what to do. The original is chained as ``__cause__``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os

from packaging.version import InvalidVersion, Version

from ..errors import AdaTPEnvironmentError, AdaTPInputError, AdaTPTransformersError, is_out_of_memory
from ..memory import is_interrupt

log = logging.getLogger(__name__)

# The declared minimum: pyproject.toml and requirements.txt say ">=" this (test_versions checks it).
MINIMUM = "5.17"
# The newest release the whole suite ran on, and the day it did.
NEWEST_TESTED = "5.25.0"
TESTED_ON = "2026-12-05"

DOCTOR = "python -m adatp_core doctor"
OLDER, TESTED, NEWER = "older", "tested", "newer"
# What transformers raises when its code and the pack's no longer agree (a method renamed or added,
# an argument changed, a config key moved). Running out of memory, interrupts and the pack's own
# errors are never among them (``transformers_boundary`` checks them first).
UNEXPECTED = (AttributeError, TypeError, LookupError, NotImplementedError, ImportError, ValueError)


def installed() -> str:
    """The installed transformers' version string, from the module imported now (transformers puts
    a new module object in sys.modules when its first submodule loads)."""
    return importlib.import_module("transformers").__version__


def release(version: str | None = None) -> Version | None:
    """The release ``version`` (default: the installed one) belongs to, or None if it cannot be
    parsed. A pre-release or local build counts as its release (5.26.0.dev0 is 5.26.0)."""
    try:
        return Version(Version(version or installed()).base_version)
    except InvalidVersion:
        return None


def support(version: str | None = None) -> str:
    """``OLDER`` than the minimum, ``NEWER`` than the newest tested, or ``TESTED`` (within the
    range; an unparsable version counts as tested, as nothing better can be said).

    A pre-release or local build counts as its release (5.26.0.dev0 is 5.26.0: newer)."""
    found = release(version)
    if found is None:
        return TESTED
    if found < Version(MINIMUM):
        return OLDER
    if found > Version(NEWEST_TESTED):
        return NEWER
    return TESTED


def install_command() -> str:
    """The pip command for the newest tested release."""
    return f"pip install transformers=={NEWEST_TESTED}"


def tested_range() -> str:
    return f"{MINIMUM} to {NEWEST_TESTED} (newest tested on {TESTED_ON})"


def standing(version: str | None = None) -> str:
    """Where ``version`` (default: the installed one) stands against the tested range, in the words
    that the load warning, the doctor's failure line and the clear error all use after
    "transformers VERSION is"."""
    return {NEWER: f"newer than the newest tested ({NEWEST_TESTED})",
            OLDER: f"older than this pack's minimum {MINIMUM}",
            TESTED: f"within the tested range ({tested_range()})"}[support(version)]


def describe(version: str | None = None) -> str:
    """The installed release against the tested range, for the doctor's environment block."""
    version = version or installed()
    where = {OLDER: f"is OLDER than the minimum: install the newest tested ({install_command()})",
             NEWER: "is NEWER than the newest tested: this self-check is its test",
             TESTED: "is within the range"}[support(version)]
    return f"{tested_range()}; {version} {where}"


def warn_if_untested() -> None:
    """Log one warning per process when the installed transformers is outside the tested range."""
    _warn_once(installed())


@functools.cache
def _warn_once(version: str) -> None:
    kind = support(version)
    if kind == NEWER:
        log.warning("transformers %s is %s, on %s. It will most likely work; run `%s` once to check every model "
                    "family, and if a family fails, install the tested release: %s", version, standing(version),
                    TESTED_ON, DOCTOR, install_command())
    elif kind == OLDER:
        log.warning("transformers %s is %s (its requirements exclude it; it was installed anyway): model families "
                    "may fail. Install the newest tested release: %s, then run `%s`", version, standing(version),
                    install_command(), DOCTOR)


# ----- errors raised inside transformers -----------------------------------------------------
@functools.cache
def _package_dir(name: str) -> str | None:
    """The real path of an imported package's directory, with a trailing separator."""
    try:
        module = importlib.import_module(name)
    except ImportError:
        return None
    return os.path.join(os.path.realpath(os.path.dirname(module.__file__)), "")


def _inside(filename: str, directory: str | None) -> bool:
    return directory is not None and os.path.realpath(filename).startswith(directory)


def raised_in_transformers(exc: BaseException) -> bool:
    """Whether transformers' own code raised ``exc``: the innermost traceback frame that is not
    PyTorch's (its module-call machinery and the functions transformers calls) nor frozen
    importlib lies inside the installed transformers package.

    So an argument or attribute that transformers asks of the pack's objects and they lack
    counts (Python raises it in transformers' frame); an error raised in the pack's own code
    (the attention hook, the cache forms) does not, even when transformers called it.
    """
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    torch_dir = _package_dir("torch")
    for filename in reversed(frames):
        if filename.startswith("<frozen") or _inside(filename, torch_dir):
            continue
        return _inside(filename, _package_dir("transformers"))
    return False


def transformers_error(exc: BaseException, family: str, stage: str) -> AdaTPTransformersError:
    """The pack's error for ``exc``, raised inside transformers while ``family`` (a model_type)
    ran ``stage``: the family, the installed and tested versions, what to do, the original's
    type and first line."""
    version = installed()
    text = str(exc).strip()
    first = text.splitlines()[0][:300] if text else ""
    kind = support(version)
    if kind == NEWER:
        advice = (f"transformers {version} is {standing(version)} and changed something the pack relies on. Run "
                  f"`{DOCTOR}` to see which model families work with it, and install the newest tested version: "
                  f"{install_command()}")
    elif kind == OLDER:
        advice = (f"transformers {version} is {standing(version)} (the pack's requirements exclude it). Install "
                  f"the newest tested version: {install_command()}, then run `{DOCTOR}`")
    else:
        advice = (f"transformers {version} is within that range, so the pack or this installation is at fault. "
                  f"Run `{DOCTOR}` and report its table with this message; reinstalling the newest tested version "
                  f"rules out a damaged installation: {install_command()} --force-reinstall")
    return AdaTPTransformersError(
        f"model family {family}: transformers {version} failed in {stage} ({type(exc).__name__}: {first}). "
        f"The pack is tested with transformers {tested_range()}; {advice}.")


@contextlib.contextmanager
def transformers_boundary(family: str, stage: str):
    """Around a call into transformers during a run: an ``UNEXPECTED`` error that transformers'
    own code raised (``raised_in_transformers``) leaves as ``transformers_error``, chained.

    Everything else leaves unchanged: the pack's errors, running out of memory (memory.py's
    handling needs it as it is), interrupts, and errors raised outside transformers.
    family: the model_type; stage: what ran, in words ("the decoder layers").
    """
    try:
        yield
    except UNEXPECTED as exc:
        if (isinstance(exc, (AdaTPInputError, AdaTPEnvironmentError)) or is_out_of_memory(exc)
                or is_interrupt(exc) or not raised_in_transformers(exc)):
            raise
        raise transformers_error(exc, family, stage) from exc
