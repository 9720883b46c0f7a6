"""Errors a person acts on: shown as one line, never as a stack trace."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (environment, arguments, files); the CLI prints it as one line."""

    exit_code = 1


class ConfigError(UserError):
    """Bad configuration or command-line arguments; the message names the field."""

    exit_code = 2


class InvalidDocument(ValueError):
    """A document that cannot be scored: data, not a bug. The daemon routes it to the DLQ.

    `reason` is a short stable code used in the DLQ's reason header and in metric labels
    (for example "empty_text", "too_large", "invalid_utf8", "not_a_map", "bad_type").
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
