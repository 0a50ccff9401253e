"""One error type for everything a user can fix: the CLI prints it as one line and exits 2.

Anything else that escapes is our bug and keeps its traceback.
"""

from __future__ import annotations


class PrunekitError(ValueError):
    """A problem with the user's input (settings, paths, data, checkpoints) that they can fix.

    The message names the problem and the fix in one line. It is a ``ValueError`` so callers that
    caught ``ValueError`` before keep working.
    """
