#!/usr/bin/env bash
# The suite as two pytest runs side by side (`make test`): the Triton-interpreter and kernel tests, which
# keep one core busy in one process, beside the rest, whose stacks of worker processes mostly start and
# wait. On CI's 2 cores one run alone left a third of the CPU idle (21.5 min for 28 min of CPU time).
# Each run's output is printed when both are done; the exit status is the first failure's.
set -uo pipefail
PY=${PY:-python}
logs=$(mktemp -d)
"$PY" -m pytest tests/engine tests/kernels "$@" >"$logs/interpreter.log" 2>&1 &
first=$!
"$PY" -m pytest tests --ignore=tests/engine --ignore=tests/kernels "$@" >"$logs/processes.log" 2>&1 &
second=$!
wait "$first"; rc_first=$?
wait "$second"; rc_second=$?
cat "$logs/interpreter.log" "$logs/processes.log"
rm -rf "$logs"
[ "$rc_first" -ne 0 ] && exit "$rc_first"
exit "$rc_second"
