"""The `diffseg` command: segment volumes, train and evaluate models, manage the model cache."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import traceback
import warnings

from DiffSegCore import __version__
from DiffSegCore.cli.evaluate import add_evaluate_parser
from DiffSegCore.cli.models import add_models_parser
from DiffSegCore.cli.segment import add_segment_parser
from DiffSegCore.cli.train import add_train_parser
from DiffSegCore.errors import DiffSegError, one_line
from DiffSegCore.events import ERROR, encode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffseg", description=__doc__)
    parser.add_argument("--version", action="version", version=f"diffseg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_segment_parser(subparsers)
    add_models_parser(subparsers)
    add_train_parser(subparsers)
    add_evaluate_parser(subparsers)
    _debug_after_subcommands(parser)
    return parser


def _debug_after_subcommands(parser: argparse.ArgumentParser) -> None:
    """Let --debug follow any subcommand too (`diffseg segment ... --debug`). argparse has no public way
    to list subparsers, hence _actions; SUPPRESS keeps the top-level value when a subcommand lacks the flag."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
                _debug_after_subcommands(sub)


def _report_error(args: argparse.Namespace | None, message: str) -> None:
    from tqdm import tqdm

    if args is not None and getattr(args, "progress", None) == "json":
        print(encode({"stage": ERROR, "message": message}), flush=True)
    tqdm.write(f"error: {message}", file=sys.stderr)  # on its own line even while a progress bar is drawn


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line, like an error (Python's format adds a source location and line)."""
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    # Slicer's Cancel sends SIGTERM: handle it like Ctrl-C so temporary files are removed.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.func(args)
    except DiffSegError as exc:
        if args.debug:
            traceback.print_exc()
        _report_error(args, str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _report_error(args, getattr(args, "interrupted", "interrupted; no outputs were written for the unfinished case"))
        return 130
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        _report_error(args, one_line(exc))
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
