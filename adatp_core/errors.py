"""Typed, actionable errors.

Every message says what is wrong and what to do about it. Bad user input is a
``ValueError`` subclass; a problem with the environment (missing package, out of
memory, decoder crash) is a ``RuntimeError`` subclass.
"""

from __future__ import annotations


class AdaTPInputError(ValueError):
    """A user-supplied value (path, question, parameter, file) cannot be used."""


class AdaTPEnvironmentError(RuntimeError):
    """The machine or installation cannot do what was asked."""


class AdaTPInterrupted(RuntimeError):
    """The user interrupted a run (ComfyUI's Cancel button or Ctrl-C)."""
