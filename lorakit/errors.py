"""The exception types user-facing failures raise; the CLI prints them as one line with an exit code."""


class LorakitError(ValueError):
    """A bad input or file: the message says what, where, and how to fix it."""

    exit_code = 2


class TrainingStopped(LorakitError):
    """A run stopped on purpose (NaN loss); its last good checkpoint is kept."""

    exit_code = 3


class TrainingInterrupted(LorakitError):
    """Ctrl-C: a checkpoint was saved and the run can be resumed."""

    exit_code = 130


class PeerStopped(TrainingStopped):
    """Another process of a distributed run stopped: this one stops too (the launcher names the one that failed)."""

    # Under `lorakit train --nproc`, the launcher's line names the process that failed first; the others stay quiet.
    quiet_when_launched = True


class UnknownAdapter(LorakitError):
    """A request or call named an adapter that is not registered (or is being removed)."""

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name


class LorakitWarning(UserWarning):
    """Something works but is probably not what the user meant; the CLI prints it as one line."""
