"""Sandbox name validation (the seed's rule, shared with the cloud control plane).

A name is 1..=128 characters of ASCII letters, digits, ``.``, ``-`` and ``_``, and starts
with a letter or a digit.
"""

from __future__ import annotations

import re

from .errors import InvalidConfig

__all__ = ["MAX_NAME_LEN", "is_valid_sandbox_name", "validate_sandbox_name"]

MAX_NAME_LEN = 128

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def is_valid_sandbox_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and 1 <= len(name) <= MAX_NAME_LEN
        and _NAME.fullmatch(name) is not None
    )


def validate_sandbox_name(name: object) -> str:
    """Return ``name`` unchanged, or raise :class:`InvalidConfig` saying what is wrong."""
    if not isinstance(name, str):
        raise InvalidConfig(f"sandbox name must be a string, got {type(name).__name__}")
    if not name:
        raise InvalidConfig("sandbox name must not be empty")
    if len(name) > MAX_NAME_LEN:
        raise InvalidConfig(
            f"sandbox name is {len(name)} characters long; the limit is {MAX_NAME_LEN}"
        )
    if not name[0].isascii() or not name[0].isalnum():
        raise InvalidConfig(f"sandbox name {name!r} must start with a letter or a digit")
    if _NAME.fullmatch(name) is None:
        raise InvalidConfig(
            f"sandbox name {name!r} may only contain ASCII letters, digits, '.', '-' and '_'"
        )
    return name
