"""Paper-comparable evaluation: rFID/IS (TF-compatible Inception), PSNR, SSIM, LPIPS, codebook usage, reference
statistics and linear probes, computed across ranks from running sums.

    from tokscale.evaluation import EvalConfig, ReconEvaluator, evaluate_reconstruction, evaluate_in_training

Names resolve lazily so that ``tokscale --help`` (which imports tokscale.evaluation.cli) never imports torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EvalConfig": "tokscale.evaluation.config",
    "ReconEvaluator": "tokscale.evaluation.recon",
    "evaluate_reconstruction": "tokscale.evaluation.recon",
    "evaluate_in_training": "tokscale.evaluation.recon",
    "ProbeConfig": "tokscale.evaluation.probe",
    "train_linear_probe": "tokscale.evaluation.probe",
    "logistic_probe": "tokscale.evaluation.probe",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tokscale.evaluation' has no attribute {name!r}")
