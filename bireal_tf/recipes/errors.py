"""The errors a training run raises for the user (the CLI prints them as one line)."""


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what was kept."""


class RunDirError(TrainingError):
    """The output directory belongs to another run."""
