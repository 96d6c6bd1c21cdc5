#!/usr/bin/env bash
# The whole check, in order, stopping at the first failure:
#   1. ruff check + ruff format --check   2. mypy --strict (scripts/typecheck.sh)
#   3. pytest over tests/, with a throw-away docker-registry on 127.0.0.1:<free port>
#      exported as CORRAL_TEST_REGISTRY (stopped on exit).
# Expects the venv from scripts/setup.sh; `bash scripts/setup.sh test` runs set-up then this.
# Extra arguments are passed to pytest (e.g. `bash scripts/check.sh -k registry`).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bin=$repo/.venv/bin
[ -x "$bin/pytest" ] || {
  echo "check: $bin/pytest missing; run: bash scripts/setup.sh" >&2
  exit 1
}

now() { date +%s.%N; }
t_all=$(now)
t_phase=$t_all
section() {
  t_phase=$(now)
  echo
  echo "=== $* ==="
}
passed() {
  awk -v a="$t_phase" -v b="$(now)" -v m="$*" 'BEGIN { printf "--- ok: %s (%.1fs)\n", m, b - a }'
}
fail() {
  echo "!!! FAILED: $*" >&2
  exit 1
}

tmp=$(mktemp -d)
registry_pid=
cleanup() {
  if [ -n "$registry_pid" ]; then
    kill "$registry_pid" 2>/dev/null || true
    wait "$registry_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. lint --------------------------------------------------------------------------
section "1/3 lint: ruff check, ruff format --check"
"$bin/ruff" check --no-cache . || fail "ruff check (fix: .venv/bin/ruff check --fix .)"
"$bin/ruff" format --no-cache --check . || fail "ruff format (fix: .venv/bin/ruff format .)"
passed "lint"

# --- 2. types -------------------------------------------------------------------------
section "2/3 typecheck: mypy --strict -p corral (tests/ and bench/ included)"
bash scripts/typecheck.sh || fail "mypy"
passed "typecheck"

# --- 3. tests -------------------------------------------------------------------------
section "3/3 pytest"

# Sandboxes need unprivileged user namespaces; say so up front when they are missing.
if unshare -U true 2>/dev/null; then
  echo "user namespaces: ok"
else
  echo "user namespaces: NOT available here (unshare -U failed); sandbox tests will fail or skip"
fi

free_port() {
  "$bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
registry_up() {
  "$bin/python" - "$1" <<'EOF'
import sys
import urllib.request

try:
    with urllib.request.urlopen(f"http://{sys.argv[1]}/v2/", timeout=1) as r:
        sys.exit(0 if r.status == 200 else 1)
except OSError:
    sys.exit(1)
EOF
}
start_registry() {
  command -v docker-registry >/dev/null || fail "docker-registry not installed (run: bash scripts/setup.sh)"
  local try port addr config=$tmp/registry.yml log=$tmp/registry.log i
  mkdir -p "$tmp/registry-data"
  for try in 1 2 3; do
    port=$(free_port)
    addr=127.0.0.1:$port
    # Debian's docker-registry (distribution 2.8) config format, cf. /etc/docker/registry/config.yml.
    cat >"$config" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
  fields:
    service: registry
storage:
  filesystem:
    rootdirectory: $tmp/registry-data
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: $addr
  headers:
    X-Content-Type-Options: [nosniff]
EOF
    # No REGISTRY_* overrides from the environment: this config is the whole truth.
    env $(env | sed -n 's/^\(REGISTRY_[A-Za-z0-9_]*\)=.*/-u \1/p') \
      docker-registry serve "$config" </dev/null >"$log" 2>&1 &
    registry_pid=$!
    for i in $(seq 100); do
      if registry_up "$addr"; then
        export CORRAL_TEST_REGISTRY=$addr
        echo "docker-registry: $addr (pid $registry_pid, storage $tmp/registry-data)"
        return 0
      fi
      kill -0 "$registry_pid" 2>/dev/null || break
      sleep 0.1
    done
    echo "docker-registry did not come up on $addr (try $try):" >&2
    cat "$log" >&2
    kill "$registry_pid" 2>/dev/null || true
    wait "$registry_pid" 2>/dev/null || true
    registry_pid=
  done
  fail "could not start docker-registry"
}
start_registry

junit=$tmp/junit.xml
set +e
"$bin/pytest" -p no:cacheprovider -rs --junitxml="$junit" "$@"
rc=$?
set -e
case $rc in
  0) ;;
  5) fail "pytest collected no tests (exit 5): a run that runs nothing does not pass" ;;
  *) fail "pytest (exit $rc)" ;;
esac
# Exit 0 with every test skipped or deselected also ran nothing: refuse that too.
read -r n_passed n_failed n_skipped < <("$bin/python" - "$junit" <<'EOF'
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
total, failed, skipped = 0, 0, 0
for s in suites:
    total += int(s.get("tests", 0))
    failed += int(s.get("failures", 0)) + int(s.get("errors", 0))
    skipped += int(s.get("skipped", 0))
print(total - failed - skipped, failed, skipped)
EOF
)
[ "$n_passed" -gt 0 ] || fail "pytest passed but no test actually ran (all skipped?)"
passed "pytest"

awk -v a="$t_all" -v b="$(now)" 'BEGIN { printf "\n=== all checks passed (%.1fs) ===\n", b - a }'
echo "pytest: $n_passed passed, $n_failed failed, $n_skipped skipped"
