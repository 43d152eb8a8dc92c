"""Write the running environment's packages as the pip constraints file ``requirements/lock.txt``.

Run by ``make lock`` with the interpreter of ``.venv-latest``, after the suite and ``emkd demo --quick`` passed in
it, so that the lock only ever records a set of versions that was tested together. emkd itself (installed editable)
is left out; local version labels (``torch==2.13.0+cpu``) are dropped, so that the lock admits the same release built
for another device (``make test TORCH="torch==2.13.0 --index-url ..."``).

Usage: python tools/write_lock.py requirements/lock.txt
"""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from pathlib import Path


def frozen() -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                         check=True, capture_output=True, text=True).stdout
    lines = []
    for line in out.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.lower().startswith("emkd"):
            continue
        if "==" not in line:
            raise SystemExit(f"write_lock: cannot lock {line!r}: not a release from an index (name==version)")
        lines.append(line.split("+", 1)[0])
    return sorted(lines, key=str.lower)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    path = Path(argv[0])
    header = [
        "# The exact versions emkd's suite and `emkd demo --quick` last passed on together; `make demo` and",
        "# `make test` install them (pip constraints). Regenerate with `make lock` (tests the newest releases first).",
        f"# Written {datetime.date.today().isoformat()} on Python {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}.",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header + frozen()) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
