"""What a stage raises when it cannot run with what it was given; each message names the problem."""

from __future__ import annotations

from zebra.errors import ZebraInputError


class StageError(ZebraInputError, RuntimeError):
    """A stage cannot run with what it was given; the message names the problem (an input error: the command
    line prints it as one line, zebra.__main__)."""


class TokenizerMismatchError(StageError):
    """Teacher and student tokenizers differ (KD over the vocabulary needs the same token ids)."""


class NonFiniteLossError(StageError):
    """The training loss became NaN or infinite."""


class MissingArtifactError(StageError):
    """A previous stage's export is missing."""
