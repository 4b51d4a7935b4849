#!/usr/bin/env bash
# The newest releases, watched: a fresh virtual environment that ignores constraints.txt (pip takes the
# newest release of every package the course needs), then the unit tests and the notebooks in fast mode.
# It reports what breaks and always exits 0 unless it could not run at all: the locked set in
# constraints.txt is what the course is tested on; this says what the next lock will have to handle.
#   scripts/watch_newest.sh              # about as long as the README's test command, plus the install
# torch stays at the locked release (a newer one is a multi-GB CUDA download on most machines);
# WATCH_TORCH=2.14.1 tries another. WATCH_SECONDS (default 900) bounds the test run: the unit tests
# run first (where a new notice or API change shows first), then the fast notebooks in the time left.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$venv")"' EXIT
torch_version=${WATCH_TORCH:-$(sed -n 's/^torch==//p' "$here/constraints.txt")}
echo "watch: newest releases in $venv (torch $torch_version); this does not decide whether the course passes"
"${PYTHON:-python3}" -m venv "$venv" || exit 2
. "$venv/bin/activate"
python -m pip install -q --upgrade pip || exit 2
python -m pip install -q "torch==$torch_version" || exit 2
# --upgrade-strategy eager: the newest release of every dependency, not only of the direct ones.
python -m pip install -q --upgrade --upgrade-strategy eager -e "$here[test]" "torch==$torch_version" || exit 2
echo "watch: what differs from constraints.txt"
python "$here/scripts/lock_versions.py" --check --extras test
cd "$here"
budget=${WATCH_SECONDS:-900}
SECONDS=0
# The README's test command without the browser tests (CI=true would count their skip as a failure),
# in two parts so that a short budget still covers the unit tests.
CI= timeout "$budget" pytest -q -m "not browser" tests 2>&1 | tail -25
unit=${PIPESTATUS[0]}
left=$(( budget - SECONDS ))
if [ "$left" -ge 60 ]; then
    CI= timeout "$left" pytest -q notebooks 2>&1 | tail -25
    notebooks=${PIPESTATUS[0]}
else
    notebooks=skipped
fi
for part in "unit tests:$unit" "fast notebooks:$notebooks"; do
    name=${part%%:*} status=${part##*:}
    case "$status" in
        0) echo "watch: the newest releases pass the $name" ;;
        124) echo "watch: the $name stopped at the time limit (${budget} s in all; what ran is above)" ;;
        skipped) echo "watch: the $name did not run (${budget} s in all were spent on the unit tests)" ;;
        *) echo "watch: the newest releases break the $name (pytest exit $status, failures above); the locked set is unaffected" ;;
    esac
done
exit 0
