"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class PassZooError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class AdapterError(PassZooError):
    """The layer-sequence adapter cannot prune this architecture safely."""


class BudgetError(PassZooError):
    """The requested compute budget cannot be met."""


class DataError(PassZooError):
    """A dataset is missing, empty or malformed."""


class BackboneError(PassZooError):
    """A model name or pretrained-weights source cannot be used."""


class RunDirError(PassZooError):
    """The output folder cannot be used."""
