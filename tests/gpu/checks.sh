#!/usr/bin/env bash
# Every GPU check of issues 15 (train-step MFU, compile / channels-last, largest batch at 80 GB, the quantizer on
# CUDA) and 16 (VAR sampling on CUDA), in one run on a lent device machine. Prepare here with
# tests/gpu/fetch_wheels.sh, then with the device tool:
#   run(command="bash tests/gpu/checks.sh", carry=[".whl"], timeout_s=590)
# Results: $OUT/results.jsonl (one JSON object per check, named) and $OUT/checks.log (stderr of each).
# Each check has its own time limit (LIMIT seconds, default 150) so that one slow check cannot eat the others.
set -uo pipefail
OUT=${OUT:-/tmp/tokscale-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . \
    || { echo "install failed"; exit 1; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 DS_BUILD_OPS=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/checks.log"
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 \
    | tail -1 | tee -a "$OUT/checks.log"
check() {  # check NAME ARGS...: one tokscale command, its JSON line into results.jsonl under NAME
    local name=$1; shift
    local t0=$SECONDS
    local json
    json=$(timeout "${LIMIT:-150}" python3 -m tokscale.cli "$@" 2>>"$OUT/checks.log" | tail -1)
    local rc=$?
    echo "== $name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/checks.log"
    python3 - "$name" "$rc" "$json" >>"$OUT/results.jsonl" <<'PY'
import json, sys
name, rc, text = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    body = json.loads(text)
except ValueError:
    body = {"unparsed": text[-500:]}
print(json.dumps({"check": name, "rc": rc, **body}))
PY
}
# issue 15: the full step at 256 px in bf16, eager, then compiled with channels-last
check s-s-b32 bench tokenizer 2d-S-S --batch 32 --precision bf16 --steps 5 --warmup 2
check s-s-b64 bench tokenizer 2d-S-S --batch 64 --precision bf16 --steps 5 --warmup 2
check b-l-1d-b32 bench tokenizer 1d-B-L --batch 32 --precision bf16 --steps 5 --warmup 2
LIMIT=240 check s-s-b64-compile bench tokenizer 2d-S-S --batch 64 --precision bf16 --steps 5 --warmup 3 --compile --channels-last
check quantizer bench quantizer --device cuda --n 512 65536 262144 --repeats 5
# the largest batch at 80 GB (each try a fresh process) at the recipe's ZeRO stage
LIMIT=200 check maxbatch-2d-S-S bench tokenizer 2d-S-S --find-batch --memory-gb 80 --batch 64 --precision bf16
LIMIT=200 check maxbatch-1d-B-L bench tokenizer 1d-B-L --find-batch --memory-gb 80 --batch 32 --precision bf16
# issue 16: VAR sampling on CUDA, KV budgets and CoDe
check var-d16 bench sample var-d16 --batch 8 --device cuda
echo "done in ${SECONDS}s" | tee -a "$OUT/checks.log"
