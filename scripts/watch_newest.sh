#!/usr/bin/env bash
# The newest releases, watched: a fresh virtual environment that ignores constraints.txt (pip takes the
# newest release of every package the course needs), then the unit tests and the notebooks in fast mode.
# It reports what breaks and always exits 0 unless it could not run at all: the locked set in
# constraints.txt is what the course is tested on; this says what the next lock will have to handle.
#   scripts/watch_newest.sh              # about as long as the README's test command, plus the install
# torch stays at the locked release (a newer one is a multi-GB CUDA download on most machines);
# WATCH_TORCH=2.14.1 tries another. WATCH_MINUTES (default 15) bounds the test run.
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
status=0
# The README's test command without the browser tests (CI=true would count their skip as a failure).
CI= timeout "$(( ${WATCH_MINUTES:-15} * 60 ))" pytest -q -m "not browser" 2>&1 | tail -40
status=${PIPESTATUS[0]}
if [ "$status" -eq 0 ]; then
    echo "watch: the newest releases pass the unit tests and the fast notebooks"
elif [ "$status" -eq 124 ]; then
    echo "watch: stopped after ${WATCH_MINUTES:-15} minutes (what ran is above)"
else
    echo "watch: the newest releases break something (pytest exit $status, failures above); the locked set is unaffected"
fi
exit 0
