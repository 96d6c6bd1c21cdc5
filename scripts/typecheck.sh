#!/usr/bin/env bash
# mypy --strict over the whole `corral` package, tests/ and bench/ included.
#
# The repo root *is* the package (pyproject: package-dir {"corral" = "."}) and the editable
# install reaches it through a setuptools import hook that mypy cannot follow. So we give
# mypy a directory holding a symlink `corral -> <repo>` on MYPYPATH and check `-p corral`.
# Directories without __init__.py (tests/) are crawled as namespace packages; dot-dirs
# (.venv, .git, .mypy_cache) are not. The symlink lives at a fixed place inside the
# script's own cache dir (.mypy_cache/typecheck, git-ignored): mypy's incremental cache
# replays old messages with the old paths, so a fresh temp dir per run would garble them.
# Paths in the output are rewritten to be relative to the repo.
# Extra arguments go to mypy (e.g. --no-incremental).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
mypy=$repo/.venv/bin/mypy
[ -x "$mypy" ] || {
  echo "typecheck: $mypy missing; run: bash scripts/setup.sh" >&2
  exit 1
}

cache=.mypy_cache/typecheck
mkdir -p "$cache/src"
ln -sfn ../../.. "$cache/src/corral"
[ "$(cd "$cache/src/corral" && pwd -P)" = "$(pwd -P)" ] || {
  echo "typecheck: $cache/src/corral does not point at the repo" >&2
  exit 1
}

set +e
MYPYPATH=$cache/src "$mypy" --config-file pyproject.toml --cache-dir "$cache" "$@" -p corral 2>&1 |
  sed -e "s|^$cache/src/corral/||" -e "s|^$repo/$cache/src/corral/||"
exit "${PIPESTATUS[0]}"
