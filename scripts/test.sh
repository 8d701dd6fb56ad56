#!/usr/bin/env bash
# Run the test suite.  Creates/updates .venv, installs the Debian packages that
# napari's OpenGL canvas needs headless (Xvfb + Mesa) when they are missing, and runs
# pytest under xvfb-run.  Extra arguments go to pytest (e.g. -m "not slow").
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$PVS_ROOT"

GUI_PACKAGES=(xvfb xauth libgl1-mesa-dri libegl1 libgl1 libfontconfig1 libdbus-1-3
              libxkbcommon0 libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-image0
              libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xfixes0
              libxcb-xinerama0 libxcb-xkb1 libx11-xcb1)
if ! command -v xvfb-run >/dev/null 2>&1 || ! dpkg -s libxcb-cursor0 >/dev/null 2>&1; then
    _pvs_apt_install "${GUI_PACKAGES[@]}" || {
        if [ -z "${DISPLAY:-}" ]; then
            echo "napari-pvs: the GUI tests need Xvfb and Mesa (apt-get install ${GUI_PACKAGES[*]})," \
                 "or a display; cannot run them" >&2
            exit 1
        fi
    }
fi

# One pytest worker per core (pytest-xdist; a file's tests stay on one worker, so its
# module fixtures are built once), unless the arguments choose (-n N, -n 0, -p no:xdist)
# or PVS_TEST_WORKERS says how many.
WORKERS=()
case " $* " in
    *" -n"*|*"--numprocesses"*|*"no:xdist"*) ;;
    *) n=${PVS_TEST_WORKERS:-$(nproc 2>/dev/null || echo 1)}
       [ "$n" -gt 1 ] && WORKERS=(-n "$n" --dist loadfile) ;;
esac

if command -v xvfb-run >/dev/null 2>&1; then
    exec xvfb-run -a -s "-screen 0 1280x1024x24" python -m pytest "${WORKERS[@]}" "$@"
fi
exec python -m pytest "${WORKERS[@]}" "$@"
