"""The exception type for problems the user can fix (a flag, a path, a setting), shared by every layer.

Commands run through :func:`patchdpo_fast.cli.run_command` print a :class:`UserError` as one line on stderr
(``patchdpo <command>: <message>``) and exit with status 2; ``--debug`` (or ``PATCHDPO_DEBUG=1``) shows the
traceback instead. Raise it with a message that names the thing (the key, the file, the flag) and says what is
expected.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A problem with what the user asked for, reported without a traceback by the command line."""
