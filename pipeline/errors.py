"""The errors a user can fix: every message names the file or field and says the fix."""
from __future__ import annotations


class ConfigError(ValueError):
    """A user-facing configuration problem: the message says the file, the field and the fix."""
