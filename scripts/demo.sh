#!/usr/bin/env bash
# The main job on the embedded defaults: a small multi-site phantom cohort, segmented
# with the shipped starter MedNeXt and with the Frangi baseline; prints voxel and cluster
# Dice per subject and method and opens napari with the first subject when a display
# exists.  Extra arguments go to `napari-pvs demo`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$PVS_ROOT"
exec napari-pvs demo "$@"
