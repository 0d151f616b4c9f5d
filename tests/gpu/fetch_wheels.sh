#!/usr/bin/env bash
# Run here, in the repository root, before the device checks (tests/gpu/checks.sh): the wheels that the device
# machine's Python 3.12 lacks (it has torch, timm, tensorboard, scikit-image), at the versions of
# requirements/cpu.txt, into .whl/ (ignored by git; the device tool's `carry` takes it, ~6 MB).
# DeepSpeed publishes no wheel: one is built here without its C++ ops (they are built just in time if used).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qxF '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
PY=.venv/bin/python
pin() { grep -i "^$1==" requirements/cpu.txt; }
mkdir -p .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "$(pin webdataset)" "$(pin braceexpand)" "$(pin lpips)" "$(pin omegaconf)" "$(pin submitit)" "$(pin hjson)" \
    "$(pin py-cpuinfo)" "$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated-types)" \
    "$(pin typing-inspection)" "$(pin torch_fidelity)"
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w .whl "$(pin deepspeed)"
ls -1 .whl
