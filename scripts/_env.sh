# Sourced by scripts/demo.sh and scripts/test.sh: create or update the project's
# virtual environment (.venv, or $PVS_VENV) and put it first on PATH.
#
# The environment is re-synced whenever pyproject.toml or constraints/dev.txt change
# (a hash of both is kept in the venv).  torch comes pinned from constraints/dev.txt
# (the CPU build used in development and CI); GPU users install their CUDA build of
# torch into the venv first, or set PVS_CONSTRAINTS to their own constraints file.
set -euo pipefail

PVS_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PVS_VENV=${PVS_VENV:-$PVS_ROOT/.venv}
PVS_CONSTRAINTS=${PVS_CONSTRAINTS:-$PVS_ROOT/constraints/dev.txt}

_pvs_python() {
    for py in python3.11 python3.12 python3.10 python3; do
        if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
            echo "$py"; return 0
        fi
    done
    echo "napari-pvs: need Python >= 3.10 (python3.11 recommended); install it first" >&2
    return 1
}

_pvs_apt_install() {  # install Debian packages that are missing, when we may
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
            echo "napari-pvs: missing Debian packages: ${missing[*]} (install them with apt-get as root)" >&2
            return 1
        fi
    fi
    echo "napari-pvs: installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq >/dev/null || true
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

if [ ! -x "$PVS_VENV/bin/python" ]; then
    PY=$(_pvs_python)
    echo "napari-pvs: creating virtual environment $PVS_VENV with $PY"
    if ! "$PY" -m venv "$PVS_VENV" 2>/dev/null; then
        rm -rf "$PVS_VENV"
        _pvs_apt_install python3-venv
        "$PY" -m venv "$PVS_VENV"
    fi
fi

_pvs_stamp=$(cat "$PVS_ROOT/pyproject.toml" "$PVS_CONSTRAINTS" | sha256sum | cut -c1-16)
if [ "$(cat "$PVS_VENV/.napari-pvs-stamp" 2>/dev/null)" != "$_pvs_stamp" ]; then
    echo "napari-pvs: installing the project and its dependencies into $PVS_VENV (first run: a few minutes)"
    "$PVS_VENV/bin/python" -m pip install -q --upgrade pip
    "$PVS_VENV/bin/python" -m pip install -q -c "$PVS_CONSTRAINTS" -e "$PVS_ROOT[dev]"
    echo "$_pvs_stamp" > "$PVS_VENV/.napari-pvs-stamp"
fi
export PATH="$PVS_VENV/bin:$PATH"
