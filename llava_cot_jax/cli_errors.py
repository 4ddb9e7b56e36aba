"""One line for a user's mistake, in every entry point and tool.

A mistake (a missing or unreadable file, an existing output, a bad setting, an input over a limit) ends the
program with exit code 1 and one line on stderr:

    error: WHAT (WHERE); WHAT TO DO (--verbose shows the traceback)

The message is the exception's own: raise ValueError / FileNotFoundError / FileExistsError / ... with the what,
the where and the what-to-do in it. `--verbose` re-raises, so the traceback prints. Anything else (a bug) keeps
its traceback.

    with cli_errors.one_line_errors(verbose):       # around a main function
        ...
    cli_errors.run_absl(main)                       # an absl tool: flag errors and main's errors, one line each

This module imports nothing of the package, so any layer may use it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

# Exceptions that report a user's mistake or the environment (OSError: missing, unreadable or existing files, a
# full disk, a file that is not an image), not a bug.
USER_ERRORS = (ValueError, KeyError, OSError)

VERBOSE_HINT = "(--verbose shows the traceback)"


def message(err: BaseException) -> str:
    """The one-line text of an error: a KeyError without its quotes, an OSError with the path it concerns."""
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    if isinstance(err, OSError) and err.strerror and err.filename:
        return f"{err.strerror}: {err.filename}"
    text = str(err).strip() or type(err).__name__
    return " ".join(text.split())  # one line, whatever the library put in it


def verbose_requested(argv: list[str]) -> bool:
    """--verbose (tools, main) or absl's --verbosity=N on the command line."""
    return any(a in ("--verbose", "--verbose=true", "--verbose=1") or a.startswith("--verbosity") for a in argv)


def define_verbose() -> None:
    """Defines absl's --verbose flag once per process (main.py and every absl tool share it)."""
    from absl import flags

    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool(
            "verbose", False, "Show third-party warnings and logs and the traceback of an error (not one line)."
        )


def exit_with(text: str, code: int = 1, program: bool = True) -> None:
    """Prints `error: text` and exits with `code`. In a program (not a test calling it in-process), background
    threads of the libraries (Orbax's event loop after a failed read) may print tracebacks while the interpreter
    shuts down: after our line, the process's stderr goes nowhere."""
    print(f"error: {text} {VERBOSE_HINT}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    if program:
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
    raise SystemExit(code)


@contextlib.contextmanager
def one_line_errors(verbose: bool = False, program: bool = True) -> Iterator[None]:
    """Turns a USER_ERRORS exception raised in the block into `error: ...` and exit code 1 (re-raised if verbose).
    `program=False` for an in-process call (tests): stderr is left as it is (see exit_with)."""
    try:
        yield
    except USER_ERRORS as err:
        if verbose:
            raise
        exit_with(message(err), program=program)


def absl_flags_parser(argv: list[str]):
    """absl's flag parsing with a bad or missing flag reported as one line (absl prints the usage otherwise)."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        exit_with(f"{err}; see --help")


def run_absl(main) -> None:
    """absl.app.run(main) for a tool: one line for a bad flag and for a user's mistake in `main`."""
    from absl import app

    define_verbose()

    def guarded(argv):
        verbose = verbose_requested(sys.argv)
        if not verbose:  # absl, Orbax and JAX log at INFO under absl.app: only their errors, as in main.py
            import logging

            from absl import logging as absl_logging

            absl_logging.set_verbosity(absl_logging.WARNING)
            for name in ("absl", "orbax", "jax"):
                logging.getLogger(name).setLevel(logging.ERROR)
        with one_line_errors(verbose):
            try:
                return main(argv)
            except app.UsageError as err:
                exit_with(f"{err}; see --help")

    app.run(guarded, flags_parser=absl_flags_parser)
