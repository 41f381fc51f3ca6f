#!/usr/bin/env bash
# `make test-latest`: the suite against the newest releases the registry serves, in its own venv.
# Arguments: UV VENV "LOCK_FLAGS" "TORCH_SRC" (from the Makefile). Writes bench/results/test-latest.txt.
set -uo pipefail
uv=$1 venv=$2 lock_flags=$3 torch_src=$4
report=bench/results/test-latest.txt
latest=$(mktemp -d)/latest.txt
overrides=$(dirname "$latest")/overrides.txt

.venv-tools/bin/python requirements/unbounded.py pyproject.toml > "$overrides"
# shellcheck disable=SC2086  # the flag strings are word lists on purpose
$uv pip compile -q pyproject.toml --extra dev --upgrade --override "$overrides" $lock_flags -o "$latest" || {
    echo "test-latest: the newest releases do not resolve together (uv's message above)" | tee "$report"
    exit 1
}
test -x "$venv/bin/python" || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip==26.3
# shellcheck disable=SC2086
"$venv/bin/python" -m pip install -q $torch_src -r requirements/torch-cpu.txt
# shellcheck disable=SC2086
"$venv/bin/python" -m pip install -q $torch_src -r "$latest"
"$venv/bin/python" -m pip install -q --no-deps -e .

{
    echo "# make test-latest, $(date -u +%Y-%m-%d) on $(uname -m), $("$venv/bin/python" -V)"
    echo "## versions that differ from requirements/dev.txt (lock -> latest)"
    diff <(grep -E '^[a-z0-9]' requirements/dev.txt) <(grep -E '^[a-z0-9]' "$latest") \
        | sed -n 's/^> /  latest: /p; s/^< /  locked: /p'
    echo "## suite"
} > "$report"
SDC_TEST_LATEST=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee "$latest.log"
rc=${PIPESTATUS[0]}
# The summary line and every distinct error, so the report says what broke without the whole log.
grep -E '^(FAILED|ERROR) ' "$latest.log" | sed -E 's/ - / : /' | sort | uniq -c | sort -rn | head -20 >> "$report"
grep -E '^E +[A-Za-z_.]+(Error|Exception)' "$latest.log" | sort | uniq -c | sort -rn | head -5 >> "$report"
tail -1 "$latest.log" >> "$report"
echo "test-latest: report in $report (suite exit $rc)"
exit "$rc"
