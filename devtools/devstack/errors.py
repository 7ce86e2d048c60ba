"""The one exception type the devstack raises for problems a developer can fix."""

from __future__ import annotations

__all__ = ["DevStackError"]


class DevStackError(Exception):
    """An expected, fixable failure of the local stack (missing tool, port taken, ...).

    Guarantee: ``str(error)`` is exactly one line that says what went wrong and how to
    fix it, so a command line tool can print it without a stack trace. Newlines in the
    message (for example from a subprocess's output) are folded into ``" | "``.
    """

    def __init__(self, message: str) -> None:
        one_line = " | ".join(part.strip() for part in message.splitlines() if part.strip())
        super().__init__(one_line)

    @property
    def message(self) -> str:
        """The one-line message."""
        return str(self.args[0])
