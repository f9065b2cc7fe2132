"""The error that stops a run whose data, as a whole, gives no usable sample."""

from __future__ import annotations

from hidream_ft.errors import UserError


class DataError(UserError, RuntimeError):
    """No usable sample can be made (all unreadable, all skipped by a policy, all undecodable); the message
    names the reason, the counts and what to change. The run cannot go on, hence also a RuntimeError."""
