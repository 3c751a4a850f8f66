"""A transient progress bar on stderr for work that would otherwise leave a terminal silent
for minutes (decoding thousands of images, the stress test's 31 scorings). Shown only to a
person at a terminal: logs, pipes and captured output get nothing, so no command's output
changes when it is redirected."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(description: str, total: int,
                 show: bool = True) -> Iterator[Callable[..., None]]:
    """Yields `advance(description=None)`: one step done, the bar's text replaced if given.
    `show=False` (work too short to be worth a bar) yields the same do-nothing `advance`."""
    if not (show and sys.stderr.isatty()):
        yield lambda description=None: None
        return
    from rich.console import Console  # heavy: only where a bar is shown
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(description, total=total)
        # Rich's update leaves the text as it was when description is None
        yield lambda description=None: progress.update(task, advance=1, description=description)
