"""Make Fashion-MNIST available locally and print the folder that holds it.

    python -m data_prep.fashion_mnist_fetch     (what `make fashion-mnist` runs)

Order: /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist) or
an earlier copy in ~/.cache/dcml/fashion-mnist; else torchvision's
downloader into that cache; else, as root, `apt-get install -y
dataset-fashion-mnist`. Exits 2 with a message when all of them fail.
"""

from __future__ import annotations

import os
import subprocess
import sys

from dcml.contracts.errors import DcmlError
from data_prep import fashion_mnist

PACKAGE = "dataset-fashion-mnist"


def _apt_install() -> str | None:
    """Install the Debian package; None on success, else what went wrong."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in ("install", "update-then-install"):
        if attempt == "update-then-install":
            subprocess.run(["apt-get", "update"], env=env, check=False)
        try:
            done = subprocess.run(["apt-get", "install", "-y", PACKAGE], env=env, check=False)
        except OSError as exc:
            return f"apt-get not usable ({exc})"
        if done.returncode == 0:
            return None
    return f"apt-get install -y {PACKAGE} exited with {done.returncode}"


def fetch() -> str:
    """The folder with the IDX files, fetching them if needed."""
    try:
        return str(fashion_mnist.locate(None, allow_download=False))
    except DcmlError:
        pass
    problems = []
    try:
        return str(fashion_mnist.download())
    except DcmlError as exc:
        problems.append(str(exc))
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        print(f"torchvision download failed; installing {PACKAGE} with apt-get", file=sys.stderr)
        problem = _apt_install()
        if problem is None:
            return str(fashion_mnist.locate(None, allow_download=False))
        problems.append(problem)
    else:
        problems.append(f"not root, so `apt-get install {PACKAGE}` was not tried")
    raise DcmlError(f"{fashion_mnist.SYSTEM_ROOT}: Fashion-MNIST is not installed and could not be fetched "
                    f"({'; '.join(problems)}); run `sudo apt-get install -y {PACKAGE}` or pass --root to `dcml ingest`")


def main() -> int:
    try:
        print(fetch())
    except DcmlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
