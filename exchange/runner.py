"""How every entry point runs: an error is one line on stderr and an exit code, never a
traceback; SIGINT and SIGTERM unwind like an exception, so temporaries are removed.

Exit codes: 0 done; 2 bad input or a disk problem (`ExchangeError.exit_code`, `OSError`); what an
error class states otherwise (`--verify`'s difference: 1); 130 / 143 interrupted, as shells report
128 + the signal.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from contextlib import contextmanager

from exchange.errors import ExchangeError

INTERRUPT_EXIT_CODES: dict[int, int] = {
    signal.SIGINT: 130,
    signal.SIGTERM: 143,
}  # 128 + the signal, as shells report it
BAD_INPUT_EXIT_CODE = 2


def run_command(body: Callable[[], None], when_interrupted: str) -> int:
    """Run an entry point's `body` with one-line errors and interruptible signals; its exit code.
    `when_interrupted` tells the user what an interruption left (e.g. "OUT was not written")."""
    try:
        with one_line_errors(), interruptible():
            body()
    except (Interrupted, KeyboardInterrupt) as err:
        number = err.signal_number if isinstance(err, Interrupted) else signal.SIGINT
        print(f"error: interrupted by {signal.Signals(number).name}; {when_interrupted}", file=sys.stderr)
        return INTERRUPT_EXIT_CODES[number]
    except ExchangeError as err:
        print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", BAD_INPUT_EXIT_CODE)
    except OSError as err:  # a disk problem: full, read-only, vanished
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    return 0


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr and exit 2, like every other bad input
    (argparse prints the whole usage first)."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(BAD_INPUT_EXIT_CODE)


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived: unwinds like KeyboardInterrupt, so every temporary is removed."""

    def __init__(self, signal_number: int):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


def _raise_interrupted(signal_number: int, frame) -> None:
    raise Interrupted(signal_number)


@contextmanager
def native_stderr_silenced():
    """Point file descriptor 2 at /dev/null while the command runs, and give Python's sys.stderr a
    copy of the real one: TensorFlow and absl write start-up lines (oneDNN, CPU features, "All log
    messages before absl::InitializeLog()") from C++ straight to descriptor 2, whatever
    TF_CPP_MIN_LOG_LEVEL says, and would bury a one-line error. Only when sys.stderr is that
    descriptor (not under a test's capture)."""
    try:
        real = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        real = False
    if not real:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    python_stderr = sys.stderr
    sys.stderr = open(  # noqa: SIM115 (the real stderr for the whole command; closed in `finally`)
        saved, "w", buffering=1, closefd=False, encoding=python_stderr.encoding, errors="backslashreplace"
    )
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        sys.stderr = python_stderr


@contextmanager
def one_line_errors():
    """What the entry points run under, so that an error is one line: TensorFlow's native
    logging off the terminal, and Python warnings (torch's, Keras's) ignored."""
    with native_stderr_silenced(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextmanager
def interruptible():
    """SIGTERM and SIGINT raise `Interrupted` while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, _raise_interrupted) for number in INTERRUPT_EXIT_CODES}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
