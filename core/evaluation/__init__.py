"""Evaluation primitives every model family shares: TF-compatible Inception features, Fréchet distance and
reference statistics, Inception Score, precision/recall and cached reference-batch activations, PSNR/SSIM and
codebook usage, linear probes, and the lockstep helpers that keep ranks' forward passes matched. Computed across
ranks from running sums.

    from tokscale.evaluation import EvalConfig, frechet_distance, train_linear_probe
    from tokscale.evaluation.precision_recall import precision_recall

What is specific to a tokenizer (the reconstruction evaluator and the ``tokscale eval`` jobs) lives next to it,
in tokscale.tokenizers.recon_eval and tokscale.tokenizers.eval_runner. Names resolve lazily (no torch import).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EvalConfig": "tokscale.evaluation.config",
    "frechet_distance": "tokscale.evaluation.fid",
    "GaussianStats": "tokscale.evaluation.fid",
    "load_inception": "tokscale.evaluation.inception",
    "InceptionScore": "tokscale.evaluation.inception_score",
    "lockstep": "tokscale.evaluation.lockstep",
    "manifold_radii": "tokscale.evaluation.precision_recall",
    "precision_recall": "tokscale.evaluation.precision_recall",
    "reference_activations": "tokscale.evaluation.reference",
    "ProbeConfig": "tokscale.evaluation.probe",
    "train_linear_probe": "tokscale.evaluation.probe",
    "logistic_probe": "tokscale.evaluation.probe",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        # Cache it: importing a submodule binds the submodule on this package, which for a function of the same
        # name (lockstep, precision_recall) would otherwise shadow the function from the second access on.
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tokscale.evaluation' has no attribute {name!r}")
