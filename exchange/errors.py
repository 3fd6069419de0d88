"""The exceptions the exchange raises. Every message is meant for a person and fits on one line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def printable(text: str) -> str:
    """`text` with every character that is not printable (line breaks, NUL, escape sequences,
    bidi overrides, lone surrogates) written as its Python escape: file data in a message can
    neither break it into lines nor change how a terminal shows it."""
    return "".join(
        char if char.isprintable() else char.encode("unicode_escape", "backslashreplace").decode("ascii")
        for char in text
    )


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), for one-line errors."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


class ExchangeError(Exception):
    """Base class: anything the exchange refuses to read, write or convert. Its message is made
    `printable`, so whatever a file put in it, it is one line."""

    def __init__(self, message: str = "", *args: object) -> None:
        super().__init__(printable(str(message)), *args)


class ExchangeFileError(ExchangeError):
    """A file is missing, unreadable, truncated or not of the expected kind."""


class UnsupportedLayerError(ExchangeError):
    """A model holds a layer kind (or an activation) that the exchange has no layout rule for."""


class ArchitectureMismatchError(ExchangeError):
    """A file's architecture differs from the model it is being loaded into."""


class TensorMismatchError(ExchangeError):
    """Tensors are missing, unexpected or of the wrong shape or dtype.

    The message lists every problem, sorted by key, so one run shows all of them.
    """

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[str], where: str = ""):
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        parts = []
        if missing:
            parts.append("missing tensors: " + ", ".join(missing))
        if unexpected:
            parts.append("unexpected tensors: " + ", ".join(unexpected))
        if mismatched:
            parts.append("wrong shape or dtype: " + "; ".join(mismatched))
        super().__init__((f"{where}: " if where else "") + "; ".join(parts))


@contextmanager
def framework_errors(node: Any, framework: str) -> Iterator[None]:
    """A framework's own exception while building one layer (a bug, or a config the checks let
    through) as one `UnsupportedLayerError` naming the layer, not a bare ValueError or RuntimeError
    from deep inside Keras or torch."""
    try:
        yield
    except ExchangeError:
        raise
    except (
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        RuntimeError,
        AttributeError,
        MemoryError,
        OverflowError,
        NotImplementedError,
        RecursionError,
    ) as err:
        raise UnsupportedLayerError(
            f"layer {node.name!r} ({node.kind}): {framework} cannot build it "
            f"({type(err).__name__}: {first_line(err)[:300]})"
        ) from err
