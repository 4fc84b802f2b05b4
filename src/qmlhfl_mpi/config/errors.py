"""The configuration's error type (its own module: the schema and the sections' validators both raise it)."""
from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """Invalid configuration; the message names the key, the value and the fix."""
