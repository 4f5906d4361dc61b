"""One exception type for every input problem, so the CLI can print one line and exit non-zero."""

from __future__ import annotations


class VaralignError(ValueError):
    """A problem with the user's input: the message is one line and names the file."""

    def __init__(self, message: str, path: object | None = None) -> None:
        text = f"{path}: {message}" if path is not None else message
        self.path, self.reason = path, " ".join(str(message).split())
        super().__init__(" ".join(str(text).split()))
