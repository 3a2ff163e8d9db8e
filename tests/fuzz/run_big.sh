#!/usr/bin/env bash
# The fuzzers of tests/fuzz with a big budget: every one runs VAS_FUZZ_SCALE (first
# argument, default 30) times its suite examples, with random inputs (the suite's are
# derandomized). The summary at the end counts the requests per target and the daemon
# crashes; a test fails on the first imprecise status, hang or crash, naming its input.
#   tests/fuzz/run_big.sh 30            # about 27,000 requests, 10 minutes on 2 cores
#   tests/fuzz/run_big.sh 5 -k local    # more pytest arguments after the scale
set -euo pipefail
cd "$(dirname "$0")/../.."
scale="${1:-30}"
shift || true
# No per-test timeout: one fuzzer alone may run for minutes at this budget.
VAS_FUZZ_SCALE="$scale" exec .venv/bin/python -m pytest -q -o timeout=0 tests/fuzz "$@"
