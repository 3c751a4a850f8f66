"""The one exception type a user sees: the CLI prints its message on one line and exits 2."""


class CxrlabError(Exception):
    """Bad input or an impossible request; the message names the file or option at fault.

    The message is kept to one line whatever it quotes: a newline, a control character or an
    undecodable byte inside a file name or a CSV cell is shown escaped, as Python would."""

    def __init__(self, message: object = ""):
        super().__init__(_one_line(str(message)))


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
