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


class AdaTPTransformersError(AdaTPEnvironmentError):
    """transformers' own code failed while a model family ran (hf/versions.py's
    ``transformers_boundary``): most likely a release the pack was not tested with. Every
    clip or question would fail the same way, so it is not retried as running out of memory is."""


class AdaTPInterrupted(RuntimeError):
    """The user interrupted a run (ComfyUI's Cancel button or Ctrl-C)."""


class OptionError(AdaTPInputError):
    """A setting that fits no clip or question; ``option`` names it (a command line shows its --option)."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option
