"""The one error type for "the job cannot run as asked".

Every check of user input in the library (a missing column, duplicate ids, a bad threshold
spec, a file that is not a checkpoint, an output folder of another run, ...) raises an
`InputError` or a subclass of it, with a message a user can act on. The job runner
(`jobs/cli.py`) turns it into `error: <message>` and exit status 2; anything else that
escapes a job is a bug in this project and keeps its traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """The job cannot run as asked: bad arguments, data, model or output folder."""


class JobFailed(RuntimeError):
    """The job ran but its output is not what it promised (e.g. rows in != rows out): exit 1.

    `summary` is what the job did get done, for the record.
    """

    def __init__(self, message: str, summary: object = None):
        super().__init__(message)
        self.summary = summary
