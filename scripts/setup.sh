#!/usr/bin/env bash
# One-step set-up for corral, then run something.
#
#   bash scripts/setup.sh demo   # install, then run the demo (python -m corral.demo)
#   bash scripts/setup.sh test   # install, then lint + typecheck + pytest (scripts/check.sh)
#   bash scripts/setup.sh        # install only
#
# Installs (each step is skipped when already done, so a second run is fast):
#   1. Debian packages via apt-get (root or sudo): bubblewrap, docker-registry, iproute2,
#      procps, linux-libc-dev (syscall tables the seccomp tests check against); apt-get
#      update runs only when something is missing.
#   2. A virtualenv at ./.venv (python3 >= 3.11 with venv).
#   3. `pip install -e '.[test]'` into it, skipped while a stamp holding pyproject.toml's
#      hash matches and `import corral` resolves to this checkout. If a dependency has no
#      wheel and there is no compiler, gcc + python3-dev are installed and pip is retried.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
action=${1:-install}
case $action in
  install | demo | test) ;;
  *)
    echo "usage: bash scripts/setup.sh [install|demo|test]" >&2
    exit 2
    ;;
esac

export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
venv=$repo/.venv
py=$venv/bin/python
stamp=$venv/.corral-setup-stamp
apt_packages=(bubblewrap docker-registry iproute2 procps linux-libc-dev)
build_packages=(gcc python3-dev)

now() { date +%s.%N; }
t_phase=0
phase() {
  t_phase=$(now)
  echo "=== setup: $* ==="
}
done_phase() {
  awk -v a="$t_phase" -v b="$(now)" -v m="$*" 'BEGIN { printf "--- %s (%.1fs)\n", m, b - a }'
}

as_root() {
  if [ "$(id -u)" = 0 ]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo -n "$@"
  else
    echo "setup: need root (or sudo) to run: $*" >&2
    return 1
  fi
}

missing_debs() {
  local p status
  for p in "$@"; do
    status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
    case $status in ii*) ;; *) echo "$p" ;; esac
  done
}

apt_install() {
  if ! command -v apt-get >/dev/null; then
    echo "setup: no apt-get here; install these packages yourself: $*" >&2
    return 1
  fi
  # Keep package maintainer scripts from starting daemons (docker-registry ships a
  # service on :5000 that we do not want; tests start their own on a free port).
  local policy=/usr/sbin/policy-rc.d added_policy=0
  if [ ! -e "$policy" ]; then
    as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
    added_policy=1
  fi
  local rc=0 log
  log=$(mktemp)
  {
    as_root apt-get update -qq &&
      as_root apt-get install -y -qq --no-install-recommends "$@"
  } >"$log" 2>&1 || rc=$?
  if [ "$added_policy" = 1 ]; then as_root rm -f "$policy"; fi
  if [ "$rc" != 0 ]; then
    cat "$log" >&2
    echo "setup: apt-get install $* failed" >&2
  fi
  rm -f "$log"
  return "$rc"
}

# --- 1. system packages -------------------------------------------------------------
phase "system packages (${apt_packages[*]})"
mapfile -t need < <(missing_debs "${apt_packages[@]}")
if [ "${#need[@]}" -eq 0 ]; then
  done_phase "all present, apt skipped"
else
  echo "installing: ${need[*]}"
  apt_install "${need[@]}"
  done_phase "installed ${need[*]}"
fi

# --- 2. virtualenv --------------------------------------------------------------------
phase "virtualenv $venv"
if [ -x "$py" ] && "$py" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  done_phase "present ($("$py" -V 2>&1))"
else
  base=$(command -v python3 || true)
  if [ -z "$base" ] || ! "$base" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    echo "setup: corral needs python3 >= 3.11 on PATH (found: ${base:-none})" >&2
    exit 1
  fi
  rm -rf "$venv"
  "$base" -m venv "$venv"
  done_phase "created with $("$py" -V 2>&1)"
fi

# --- 3. python packages ---------------------------------------------------------------
phase "python packages (pip install -e '.[test]')"
want=$( (sha256sum pyproject.toml && "$py" -V) 2>&1 | sha256sum | cut -d' ' -f1)
installed_here() {
  # The editable install must resolve `corral` to this very checkout.
  [ "$("$py" -c 'import corral, os; print(os.path.dirname(corral.__file__))' 2>/dev/null)" = "$repo" ]
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && installed_here; then
  done_phase "up to date, pip skipped"
else
  rm -f "$stamp"
  log=$(mktemp)
  if ! "$py" -m pip install -q -e '.[test]' 2>&1 | tee "$log"; then
    # Only a failed compile is cured by a compiler; anything else (network, resolver) is fatal.
    if grep -qE "Python\.h|gcc|unable to execute|command '[^']*' failed|Failed building wheel" "$log" &&
      [ -n "$(missing_debs "${build_packages[@]}")" ]; then
      echo "setup: a package without a wheel failed to build; installing ${build_packages[*]} and retrying"
      apt_install "${build_packages[@]}"
      "$py" -m pip install -q -e '.[test]'
    else
      rm -f "$log"
      echo "setup: pip install failed (see above)" >&2
      exit 1
    fi
  fi
  rm -f "$log"
  installed_here || {
    echo "setup: after pip install, 'import corral' does not resolve to $repo" >&2
    exit 1
  }
  echo "$want" >"$stamp"
  done_phase "installed"
fi

# --- 4. run ---------------------------------------------------------------------------
case $action in
  install) echo "setup: done. Activate with: . .venv/bin/activate" ;;
  demo)
    echo "=== demo: python -m corral.demo ==="
    exec "$py" -m corral.demo
    ;;
  test) exec bash "$repo/scripts/check.sh" ;;
esac
