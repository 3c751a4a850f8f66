"""The one exception type a user sees: the CLI prints its message on one line and exits 2."""


class CxrlabError(Exception):
    """Bad input or an impossible request; the message names the file or option at fault."""
