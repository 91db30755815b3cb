"""User-facing errors: one line that says what went wrong and what to do."""


class DiffSegError(Exception):
    """Base class for errors the CLI reports as one line (no traceback unless --debug)."""

    exit_code = 2


class InputError(DiffSegError):
    """The input volumes or options are unusable."""


class ModelError(DiffSegError):
    """The model bundle is missing, corrupt, unsafe or incompatible."""


class RuntimeFault(DiffSegError):
    """The run could not complete (memory, device, disk)."""


class CasesFailed(DiffSegError):
    """Some cases of a run failed and were skipped; the others were written (exit code 3)."""

    exit_code = 3


def one_line(exc: Exception) -> str:
    """What the user is told about `exc`: its own message, or for an unexpected error its type and first line."""
    if isinstance(exc, DiffSegError):
        return str(exc)
    first_line = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"unexpected {type(exc).__name__}: {first_line}; rerun with --debug and report it"
