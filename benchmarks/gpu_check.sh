#!/usr/bin/env bash
# The one-command GPU check (docs/accelerators.md, "GPU check"), under 8 minutes on one CUDA GPU:
#   1. tests/test_gpu.py: every callback under bf16-mixed and 16-mixed (a real GradScaler; backward variances
#      unscaled), FSDP / ModelParallel / DeepSpeed (if installed) on one device: each callback refuses at fit start
#      or works as documented; with tests/test_sharded_strategies.py (the refusals, device-independent);
#   2. benchmarks/fisher.py --device cuda, one round of one repeat: the Fisher engines' time, peak CUDA memory and
#      agreement with the naive per-sample loop.
# Each part has its own time limit (4 + 4 minutes at most). Exit status 0 only if both pass.
#   bash benchmarks/gpu_check.sh            (PYTHON=... to choose the interpreter; .venv/bin/python when present)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')" || exit 2
"$PY" -c "import torch, lightning; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| lightning', lightning.__version__)"
status=0
SECONDS=0
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py tests/test_sharded_strategies.py || status=1
echo "tests: ${SECONDS} s"
SECONDS=0
timeout 240 "$PY" -u benchmarks/fisher.py --device cuda --repeats 1 --rounds 1 || status=1
echo "Fisher benchmark: ${SECONDS} s"
exit $status
