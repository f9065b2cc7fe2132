"""The one error type of reading, converting and applying LoRAs."""

from hidream_ft.errors import UserError


class ConvertError(UserError, ValueError):
    """An adapter or checkpoint cannot be read, converted or applied as asked."""
