#!/usr/bin/env bash
# Run the predictor on an emulated Raspberry Pi OS software stack (Debian 12 arm64,
# Python 3.11) with stock LiteRT from PyPI, and check that the portable file gives the
# x86 run's top-1 on the same images; show what an LCE file does there. Not run in CI.
#
#   scripts/check_aarch64.sh MODEL_PORTABLE.tflite MODEL_LCE.tflite IMAGE [IMAGE ...]
#
# Each .tflite needs its <model>.tflite.json beside it, and the predict.py the export wrote
# beside the portable file is the one run (else the repository's). Needs root
# (apt-get install debootstrap qemu-user-static), network to Debian's archive and PyPI,
# and ~1 GB in WORK. Environment:
#   WORK             where the arm64 root and wheels go (default /tmp/bireal_aarch64; reused)
#   LITERT_VERSIONS  ai-edge-litert versions to try (default "1.2.0 2.3.0")
#   PYTHON           the x86 Python with ai-edge-litert, numpy, Pillow (default .venv/bin/python)
set -euo pipefail

if [ $# -lt 3 ]; then
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
PORTABLE=$(realpath "$1"); LCE=$(realpath "$2"); shift 2
IMAGES=(); for image in "$@"; do IMAGES+=("$(realpath "$image")"); done
HERE=$(cd "$(dirname "$0")/.." && pwd)
PREDICT="$(dirname "$PORTABLE")/predict.py"  # the one the export shipped beside the model
[ -f "$PREDICT" ] || PREDICT="$HERE/bireal_tf/export/predict.py"
WORK=${WORK:-/tmp/bireal_aarch64}
ROOT="$WORK/root"
LITERT_VERSIONS=${LITERT_VERSIONS:-"1.2.0 2.3.0"}
PYTHON=${PYTHON:-$HERE/.venv/bin/python}
mkdir -p "$WORK"

if ! command -v debootstrap >/dev/null || ! command -v qemu-aarch64-static >/dev/null; then
  apt-get update -qq && apt-get install -y -qq debootstrap qemu-user-static >/dev/null
fi
echo "== host: $(uname -m), $(qemu-aarch64-static --version | head -1)"

# Debian 12 arm64 with Python 3.11: the first (foreign) debootstrap stage downloads the
# packages; dpkg -x unpacks every one of them (nothing is configured, nothing runs as arm64).
if [ ! -x "$ROOT/usr/bin/python3.11" ]; then
  debootstrap --foreign --arch=arm64 --variant=minbase --include=python3.11 bookworm "$ROOT" \
    http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1
  for deb in "$ROOT"/var/cache/apt/archives/*.deb; do dpkg -x "$deb" "$ROOT"; done
fi
echo "== arm64 root: Debian $(cat "$ROOT/etc/debian_version"), $ROOT/usr/bin/python3.11"

run_arm64() {  # SITE predict-args...
  local site=$1; shift
  PYTHONPATH="$site" qemu-aarch64-static -L "$ROOT" "$ROOT/usr/bin/python3.11" "$PREDICT" "$@"
}
top1() { awk '/^  [0-9.]+  /{ if (!seen[file]++) print file": "$2" "$3" "$4 } /^[^ ]/{ file=$1 }'; }

echo "== x86-64 run (reference): $("$PYTHON" -c 'import ai_edge_litert, importlib.metadata as m; print("ai-edge-litert", m.version("ai-edge-litert"))')"
"$PYTHON" "$PREDICT" "$PORTABLE" "${IMAGES[@]}" | tee "$WORK/x86.txt"
top1 <"$WORK/x86.txt" | sed 's#.*/##' >"$WORK/x86.top1"

matched=0; differed=0
for version in $LITERT_VERSIONS; do
  site="$WORK/site-litert-$version"
  if [ ! -d "$site/ai_edge_litert" ]; then
    # Debian 12 has glibc 2.36: every manylinux tag up to 2.36 fits (ai-edge-litert 2.x needs >= 2.27).
    platforms=(--platform manylinux2014_aarch64)
    for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_aarch64"); done
    "$PYTHON" -m pip install --quiet --no-warn-conflicts --target "$site" --only-binary=:all: \
      "${platforms[@]}" --python-version 3.11 --implementation cp \
      "ai-edge-litert==$version" "numpy==1.26.4" pillow >"$WORK/pip-$version.log" 2>&1
  fi
  echo "== aarch64 (qemu-user), ai-edge-litert $version: portable file"
  if run_arm64 "$site" "$PORTABLE" "${IMAGES[@]}" >"$WORK/arm64-$version.txt" 2>"$WORK/arm64-$version.err"; then
    cat "$WORK/arm64-$version.txt"
    top1 <"$WORK/arm64-$version.txt" | sed 's#.*/##' >"$WORK/arm64-$version.top1"
    if cmp -s "$WORK/x86.top1" "$WORK/arm64-$version.top1"; then
      echo "-- top-1 equal to the x86 run on all ${#IMAGES[@]} images"; matched=$((matched + 1))
    else
      echo "-- TOP-1 DIFFERS from the x86 run:"; diff "$WORK/x86.top1" "$WORK/arm64-$version.top1" || true
      differed=$((differed + 1))
    fi
  else
    echo "-- did not run (exit $?): $(tail -1 "$WORK/arm64-$version.err")"
  fi
  echo "== aarch64, ai-edge-litert $version: LCE file (expected to fail: no LCE interpreter for aarch64)"
  run_arm64 "$site" "$LCE" "${IMAGES[0]}" 2>&1 | tail -2 || true
done
echo "== $matched version(s) ran and matched the x86 top-1, $differed differed"
[ "$matched" -ge 1 ] && [ "$differed" -eq 0 ]
