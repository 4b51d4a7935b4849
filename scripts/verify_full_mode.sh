#!/usr/bin/env bash
# The full course on a fresh clone: `CI=true LORA_COURSE_FAST=0 pytest`, N times in a row, with one torch.
#   scripts/verify_full_mode.sh 2.13.0 3      # about 33 minutes a run on 2 CPU cores
# Clones this checkout's HEAD into a temporary folder with its own virtual environment, so
# nothing here is touched; prints one line per run and exits non-zero if any run failed.
set -euo pipefail
torch_version=${1:?usage: $0 TORCH_VERSION [RUNS]}
runs=${2:-3}
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
git clone -q "$here" "$work/course"
cd "$work/course"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==$torch_version"
python -m pip install -q -e ".[browser,dev]"
python -m pip install -q -e ".[test]"
echo "torch $(python -c 'import torch; print(torch.__version__)') at $(git rev-parse --short HEAD); logs in $work"
failed=0
for i in $(seq 1 "$runs"); do
    start=$SECONDS
    if CI=true LORA_COURSE_FAST=0 pytest > "$work/run-$i.log" 2>&1; then status=passed; else status=FAILED; failed=1; fi
    echo "run $i: $status in $(( (SECONDS - start) / 60 )) min: $(tail -1 "$work/run-$i.log")"
done
exit "$failed"
