#!/usr/bin/env bash
# The project's one test command: format check, clippy, all tests, doc tests.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh -- --nocapture  # extra args go to both `cargo test` runs
#
# Tests start their own redis-server processes on free loopback ports
# (tests/support/mod.rs), so this script only makes sure the binaries are
# installed (redis-server, and openssl for the TLS tests' certificates).
# The Debian package's own service (systemd/init, port 6379) is never used
# or needed: whether it auto-starts on install or not makes no difference.
# Set REDIS_URL to point the shared-server tests at an existing Redis
# instead.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() {
    printf '\n==> %s\n' "$*"
}

is_root() {
    [ "$(id -u)" -eq 0 ]
}

APT_UPDATED=0
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if [ "$APT_UPDATED" -eq 0 ]; then
        apt-get update -qq
        APT_UPDATED=1
    fi
    apt-get install -y -qq "$@" </dev/null
}

# --- redis-server ----------------------------------------------------------
if ! command -v redis-server >/dev/null 2>&1; then
    if is_root && command -v apt-get >/dev/null 2>&1; then
        step "installing redis-server (apt-get)"
        apt_install redis-server
    else
        echo "redis-server is missing: install it (Debian: sudo apt-get install -y redis-server)" >&2
        exit 1
    fi
fi
command -v redis-server >/dev/null 2>&1 || {
    echo "redis-server is still missing after installing it" >&2
    exit 1
}

# --- openssl CLI: the TLS tests make throwaway certificates with it ----------
if ! command -v openssl >/dev/null 2>&1; then
    if is_root && command -v apt-get >/dev/null 2>&1; then
        step "installing openssl (apt-get)"
        apt_install openssl
    else
        echo "openssl is missing (tests/connection.rs makes TLS certificates with it): install it (Debian: sudo apt-get install -y openssl)" >&2
        exit 1
    fi
fi

# --- python3 + redis, only for scripts/ticketlock.py --------------------------
if [ -f scripts/ticketlock.py ]; then
    if ! command -v python3 >/dev/null 2>&1; then
        if is_root && command -v apt-get >/dev/null 2>&1; then
            step "installing python3 (apt-get)"
            apt_install python3 python3-pip
        else
            echo "python3 is missing (needed by scripts/ticketlock.py)" >&2
            exit 1
        fi
    fi
    if ! python3 -c 'import redis' >/dev/null 2>&1; then
        step "installing the Python redis package"
        # pip first; Debian's own python3 refuses plain pip installs
        # (PEP 668), so fall back to --break-system-packages, then to apt.
        python3 -m pip install --quiet --disable-pip-version-check redis </dev/null ||
            python3 -m pip install --quiet --disable-pip-version-check --break-system-packages redis </dev/null ||
            { is_root && command -v apt-get >/dev/null 2>&1 && apt_install python3-redis; } ||
            true
        python3 -c 'import redis' || {
            echo "could not install the Python redis package: python3 -m pip install redis" >&2
            exit 1
        }
    fi
fi

# --- cargo components --------------------------------------------------------
for component in rustfmt clippy; do
    sub=${component/rustfmt/fmt}
    if ! cargo "$sub" --version >/dev/null 2>&1; then
        if command -v rustup >/dev/null 2>&1; then
            step "installing $component (rustup)"
            rustup component add "$component"
        else
            echo "cargo $sub is missing and rustup is not available to install $component" >&2
            exit 1
        fi
    fi
done

# --- the checks -----------------------------------------------------------
step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "cargo test --all-targets $*"
cargo test --all-targets "$@"

step "cargo test --doc $*"
cargo test --doc "$@"

echo
echo "scripts/test.sh: all green"
