"""How the trainer's commands (``python -m trainer.train|infer|precompute``) answer mistakes.

A user mistake (a wrong argument, a damaged or misplaced checkpoint, a shard that is not a tar)
is a :class:`UsageError`: its one or two plain lines go to stderr and the exit code is 2, as
argparse does for a wrong argument. Anything else is a bug: its traceback is printed, with a
line saying so, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from portrait.stopping import EXIT_TERMINATED, Terminated, stop_on_sigterm

EXIT_USAGE = 2

# What reading a user's files raises: missing or unreadable files (OSError: diffusers and
# transformers wrap a bad config.json or weight file in one), bad JSON or values (ValueError),
# a safetensors file that is empty, truncated or not one.
try:
    from safetensors import SafetensorError
except ImportError:  # older safetensors
    from safetensors._safetensors_rust import SafetensorError

FILE_ERRORS = (OSError, ValueError, SafetensorError)


class UsageError(SystemExit):
    """A user mistake; ``str()`` is the message. A SystemExit, so a caller that does not catch it
    still stops with code 2 rather than a traceback."""

    def __init__(self, message: str):
        super().__init__(EXIT_USAGE)
        self.message = message

    def __str__(self) -> str:
        return self.message


def first_line(exn: BaseException) -> str:
    """An exception's own first line (library messages can run to many)."""
    text = str(exn).strip().splitlines()
    return text[0] if text else type(exn).__name__


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage block of these commands runs to many lines)."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see --help)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value}")
    return value


def quiet_libraries() -> None:
    """Per-file progress bars of transformers and diffusers drown the log and the answer."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def run(main) -> int:
    """Run a command's ``main()`` as a program: the exit code of a mistake or of a bug."""
    stop_on_sigterm()
    try:
        main()
    except UsageError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return EXIT_USAGE
    except Terminated:
        print("stopped (SIGTERM); a training run continues from its last checkpoint with --resume latest", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - a bug: show everything, and say so
        traceback.print_exc()
        print("This is a bug in hifi-portrait, not a mistake in what you gave it: please report it with the traceback above.",
              file=sys.stderr)
        return 1
    return 0
