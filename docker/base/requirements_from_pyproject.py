"""Print the [project] dependencies of a pyproject.toml, one per line,
leaving out those whose name matches an --exclude glob (e.g. 'faiss*': the
image installs the faiss build it was asked for instead)."""

import argparse
import fnmatch
import re
import tomllib

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("pyproject")
parser.add_argument("--exclude", action="append", default=[], help="glob on the distribution name")
args = parser.parse_args()

with open(args.pyproject, "rb") as handle:
    dependencies = tomllib.load(handle)["project"]["dependencies"]
for requirement in dependencies:
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower()
    if not any(fnmatch.fnmatch(name, pattern) for pattern in args.exclude):
        print(requirement)
