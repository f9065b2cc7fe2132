"""The error for perceptual-network weights that cannot be used."""

from __future__ import annotations

from hidream_ft.errors import UserError


class PerceptualWeightsError(UserError):
    """A DINO folder or an LPIPS weights file that is missing, unreadable or of the wrong layout; the message
    names the path and what is wrong with it."""
