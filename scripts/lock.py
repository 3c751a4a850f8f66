"""Write constraints.txt: the exact versions of cxrlab's dependency closure as installed here.

Run it after the suite passed on a fresh `pip install -e ".[test,pretrained]"` (or after
`scripts/check_latest.sh` passed on the newest allowed versions) to refresh the lock on purpose:

    python scripts/lock.py            # writes constraints.txt at the repository root

pyproject.toml keeps ranges (a library must not over-pin); the lock is for the app and CI.
We walk the installed metadata instead of re-resolving because the lock must name the versions
the suite actually ran against, and torch's CPU build is a local file no resolver here sees.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement

EXTRAS = ("test", "pretrained", "docs", "tracking")
ROOT = Path(__file__).resolve().parents[1]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, extras: tuple[str, ...]) -> dict[str, str]:
    pins: dict[str, str] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [(root, extras)]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while todo:
        name, want = todo.pop()
        if (canonical(name), want) in seen:
            continue
        seen.add((canonical(name), want))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # an optional extra that is not installed here
        if canonical(name) != canonical(root):
            pins[canonical(dist.metadata["Name"])] = dist.version.split("+")[0]
        for line in dist.requires or []:
            req = Requirement(line)
            env = {"extra": ""}
            if req.marker is not None and not any(
                req.marker.evaluate({**env, "extra": e}) for e in ("", *want)
            ):
                continue
            todo.append((req.name, tuple(sorted(req.extras))))
    return pins


def main() -> None:
    pins = closure("cxrlab", EXTRAS)
    header = ("# Tested versions of cxrlab's dependencies (app and CI). Refresh on purpose:\n"
              "#   python scripts/lock.py   (see scripts/check_latest.sh for the newest ones)\n"
              f"# Python {sys.version.split()[0]}\n")
    body = "".join(f"{n}=={v}\n" for n, v in sorted(pins.items()))
    (ROOT / "constraints.txt").write_text(header + body)
    print(f"constraints.txt: {len(pins)} packages")


if __name__ == "__main__":
    main()
