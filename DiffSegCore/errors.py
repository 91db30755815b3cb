"""User-facing errors: one line that says what went wrong and what to do."""


class DiffSegError(Exception):
    """Base class for errors the CLI reports as one line (no traceback unless --debug)."""


class InputError(DiffSegError):
    """The input volumes or options are unusable."""


class ModelError(DiffSegError):
    """The model bundle is missing, corrupt, unsafe or incompatible."""


class RuntimeFault(DiffSegError):
    """The run could not complete (memory, device, disk)."""
