"""The one base of every error a user can cause and fix: a bad policy or baseline, a cgroup that
does not exist, no privileges, kernel headers not found, an agent that does not answer.

Its message is one line written for them. The CLI catches InfertapError as a whole, prints that
line and exits 1 (cli/main.py): never a traceback. Each subclass also keeps the builtin base it
had (ValueError, RuntimeError, ...), so code catching those still does.
"""

from __future__ import annotations


class InfertapError(Exception):
    """A user-caused error; str() is the one line shown to them."""
