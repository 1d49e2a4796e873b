"""Errors a user can act on: each message names the problem and the fix."""


class FewShotError(Exception):
    """Base class of every error this library raises on purpose.

    The CLI prints these as one line and exits non-zero; anything else is a bug.
    """


class DataNotFoundError(FewShotError):
    """A dataset is not where it was looked for and could not be downloaded."""


class CorruptDataError(FewShotError):
    """An archive, image or cache file cannot be read; the message names it."""


class EpisodeError(FewShotError):
    """The requested ways/shots/queries cannot be served by the dataset."""
