"""The caption command's old import path: ``adatp_core.caption_cli`` is ``adatp_core.caption.cli``
(the same module object, so setting a name on one sets it on the other)."""

import sys

from .caption import cli

sys.modules[__name__] = cli
