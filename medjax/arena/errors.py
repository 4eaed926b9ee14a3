"""The arena's user-error class (printed as one ``error:`` line by ``medjax.cli_errors``)."""
from medjax.errors import UserError


class ArenaError(UserError):
    """Bad arena input; the message names the file and line, the option or the model."""
