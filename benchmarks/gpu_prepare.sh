#!/usr/bin/env bash
# Prepare the device run of benchmarks/gpu.py: copy the images its short training needs (T91 for
# training, Set5 for evaluation, about 10 MB) into benchmarks/gpu_data/ (git-ignored: the images
# belong to their authors and never enter the repository), then print the command to run.
#
#     bash benchmarks/gpu_prepare.sh          # C2D_SHARED defaults to ../shared
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
shared="${C2D_SHARED:-$repo/../shared}"
src="$shared/data"
dst="$repo/benchmarks/gpu_data"

for set in T91 Set5; do
    if [ ! -d "$src/$set" ]; then
        echo "error: $src/$set not found (set C2D_SHARED to the folder holding data/)" >&2
        exit 1
    fi
done
mkdir -p "$dst"
for set in T91 Set5; do
    rm -rf "${dst:?}/$set"
    cp -R "$src/$set" "$dst/$set"
    chmod -R u+w "$dst/$set"  # the shared copy is read-only; keep ours removable
done
echo "copied $(find "$dst" -type f | wc -l) images ($(du -sh "$dst" | cut -f1)) to benchmarks/gpu_data/"

cat <<'MSG'

Device command (repository root; carry: ["benchmarks/gpu_data"]; timeout_s 600):

    set -o pipefail; PYTHONUNBUFFERED=1 PYTHONPATH=. timeout 480 python benchmarks/gpu.py --out $OUT 2>&1 | tee $OUT/log

It writes $OUT/gpu.json, $OUT/gpu.md and $OUT/log. With pipefail the command's status is gpu.py's:
0 all ran and every correctness check passed, 1 a correctness check failed, 2 rows skipped or
errored (listed in gpu.md), 124 killed by the timeout (gpu.json/gpu.md hold what was measured).
The run plans to end within its --budget of 450 s; see docs/GPU.md.
MSG
