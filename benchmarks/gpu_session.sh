#!/bin/sh
# The GPU session's one command (docs/testing.md). Here, first: `make gpu-wheels` (Liger-Kernel and Cut Cross-Entropy
# into .whl/). Then, on the device machine, carrying .whl:
#
#     sh benchmarks/gpu_session.sh
#
# installs the carried wheels into /tmp/site (no index, no dependencies: the machine has torch and triton; without
# them the competitors' rows say "not installed") and runs `python3 -m benchmarks.report` (8 minutes on one
# H100 / H200), which writes gpu_report_DATE.md to $OUT, the folder the device tool brings back (docs/ where OUT is
# unset), rewriting it after every row. Extra arguments go to the report. Exit status: the report's.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "gpu_session: the competitors' wheels did not install (run make gpu-wheels, carry .whl)" >&2
PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
    exec python3 -m benchmarks.report --out "${OUT:-docs}/gpu_report_$(date +%F).md" "$@"
