"""The tokenizer trainer's losses under a fixed seed equal the recorded values, so a refactor shows any change.

tests/tokenizers/golden_losses.json was written by golden_run.py (first before the training machinery moved into
tokscale.loop; rewritten when the networks became GigaTok's, and when GigaTok's auxiliary losses, its DiffAug and the
discriminator's lr schedule and loss weight came in, issue 11) and once more, code unchanged, when the run was pinned to
CPU-independent kernels (golden_run.PINNED_ENV) (one rank, CPU, fp32, every loss term on: the auxiliary
terms at steps 1-2, the GAN from step 3). Re-recorded for issue 15, when the quantizer's search and entropy loss became
one sliced pass with its own backward: it equals the former code to 1e-5 in value and gradient
(tests/tokenizers/test_quantizer_chunked.py), but Adam turns those rounding-level differences of near-zero codebook
gradients into a 8.5e-5 change of step 2's grad norm (the former code alone, run with another search chunk, moved it
by 1.8e-3). The run here goes
through the command line, `tokscale train tokenizer tokenizer/demo ...`, as a user would start it.
"""

import json
import subprocess
import sys

import pytest
from golden_run import GOLDEN, logged_losses, overrides, pinned_env, write_weights_pinned


@pytest.mark.slow
def test_tokenizer_training_logs_the_recorded_losses_at_every_step(tmp_path, image_shards):
    vgg, dino = write_weights_pinned(tmp_path / "weights")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "tokscale.cli", "train", "tokenizer", "tokenizer/demo"]
    out = subprocess.run(
        cmd + overrides(run_dir, image_shards, vgg, dino),
        capture_output=True,
        text=True,
        timeout=600,
        env=pinned_env(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got, want = logged_losses(run_dir), json.loads(GOLDEN.read_text())
    assert sorted(got, key=int) == sorted(want, key=int) == [str(s) for s in range(1, 7)]
    for step, values in want.items():
        assert got[step].keys() == values.keys(), step
        # Bit-identical under golden_run.PINNED_ENV on the machine that recorded them; the tolerance only admits
        # rounding that the pinned kernels still leave to the CPU.
        assert got[step] == pytest.approx(values, rel=1e-5, abs=1e-7), f"step {step}"
