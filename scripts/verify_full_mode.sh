#!/usr/bin/env bash
# The full course on a fresh clone: `CI=true LORA_COURSE_FAST=0 pytest`, N times in a row, with one torch.
#   scripts/verify_full_mode.sh 2.13.0 3      # 18 to 37 minutes a run on 2 CPU cores
# Clones this checkout's HEAD into a temporary folder with its own virtual environment, so
# nothing here is touched; prints one line per run, keeps the logs, removes the environment,
# and exits non-zero if any run failed. TORCH_INDEX=https://download.pytorch.org/whl/cpu
# picks torch's CPU build where the default index would give the CUDA one; PYTHON picks the
# interpreter. CI=true runs the browser tests, so Debian's chromium must be installed.
set -euo pipefail
usage="usage: $0 TORCH_VERSION [RUNS (a whole number from 1, default 3)]"
torch_version=${1:?$usage}
runs=${2:-3}
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "$usage" >&2; exit 2; }
command -v chromium >/dev/null || { echo "chromium is not installed (sudo apt-get install chromium)" >&2; exit 2; }
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work/course/.venv"' EXIT
unset PYTHONPATH
git clone -q "$here" "$work/course"
cd "$work/course"
"${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch==$torch_version"
# torch pinned again, so that a conflict fails here instead of swapping the build.
python -m pip install -q -e ".[browser,dev,test]" "torch==$torch_version"
echo "torch $(python -c 'import torch; print(torch.__version__)') at $(git rev-parse --short HEAD); logs in $work"
failed=0
for i in $(seq 1 "$runs"); do
    start=$SECONDS
    if CI=true LORA_COURSE_FAST=0 pytest > "$work/run-$i.log" 2>&1; then status=passed; else status=FAILED; failed=1; fi
    echo "run $i: $status in $(( (SECONDS - start) / 60 )) min: $(tail -1 "$work/run-$i.log")"
done
exit "$failed"
