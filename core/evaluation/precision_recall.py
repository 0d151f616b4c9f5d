"""Improved precision and recall (Kynkäänniemi et al., 2019) as the ADM evaluator computes them.

The ADM evaluator (``ManifoldEstimator`` with ``nhood_sizes=(3,)`` and no ``clamp_to_percentile``), which
LlamaGen, GigaTok and DetailFlow report precision/recall with, defines:

- distance: squared euclidean, in the expanded form ``max(|u|^2 - 2 u.v + |v|^2, 0)`` (the ``max`` removes the
  negative rounding residue of the expansion), evaluated in ADM's order of operations;
- radius of a point: the (k+1)-th smallest distance from it to every point of its own set, itself included.
  Its own distance is ~0, so this is the distance to its k-th nearest other point; a duplicate of it counts as
  a neighbour at distance 0;
- precision: the fraction of generated samples whose distance to at least one real sample is ``<=`` that real
  sample's radius; recall: the fraction of real samples within ``<=`` the radius of at least one generated
  sample. A point exactly on a ball's boundary is inside.

ADM evaluates every distance block in float16 first and uses it (cast to float32) when all of its entries are
finite, recomputing the block in float32 otherwise. ``distance_dtype="float16"`` follows that path; the default
is float32 throughout. Its ``eps=1e-5`` enters only the realism score, which is not computed here.

Distances are evaluated in ``block x block`` tiles, so 50,000 samples against 10,000 references in 2048
dimensions never hold more than one tile (400 MB at ``block=10000``, ADM's batch size) plus the features.
Radii keep a running (k+1)-smallest per row instead of ADM's full row of distances.
"""

from __future__ import annotations

import numpy as np
import torch

from tokscale.evaluation.inception import full_precision_matmuls

__all__ = ["manifold_radii", "pairwise_distances", "precision_recall"]

ADM_K = 3
DISTANCE_DTYPES = ("float32", "float16")


def _features(x, what: str) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.dim() != 2:
        raise ValueError(f"{what} features must be (N, D), got shape {tuple(t.shape)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{what} features must be real numbers, got {t.dtype}")
    t = t.to(torch.float32)
    bad = ~torch.isfinite(t).all(1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()
        raise ValueError(
            f"{what} features hold non-finite values (NaN or inf) in {rows.numel()} of {t.shape[0]} rows, "
            f"first row {int(rows[0])}"
        )
    return t


def _check(k: int, block: int, distance_dtype: str) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1 (ADM: {ADM_K}), got {k}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if distance_dtype not in DISTANCE_DTYPES:
        raise ValueError(f"distance_dtype={distance_dtype!r}: expected one of {DISTANCE_DTYPES}")


def _expanded_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Squared euclidean distances (Bu, Bv) in the dtype of u and v, operations in ADM's order."""
    norm_u = (u * u).sum(1, keepdim=True)
    norm_v = (v * v).sum(1)[None, :]
    return torch.clamp_min(norm_u - 2 * (u @ v.T) + norm_v, 0.0)


def pairwise_distances(u: torch.Tensor, v: torch.Tensor, distance_dtype: str = "float32") -> torch.Tensor:
    """float32 (Bu, Bv) squared distances of two float32 blocks; ``float16`` tries half precision first and
    keeps it only when every entry is finite, as ADM's ``DistanceBlock``."""
    if distance_dtype == "float16":
        d16 = _expanded_distances(u.half(), v.half())
        if bool(torch.isfinite(d16).all()):
            return d16.float()
    return _expanded_distances(u, v)


@torch.no_grad()
def _radii(feats: torch.Tensor, k: int, block: int, distance_dtype: str) -> torch.Tensor:
    n = feats.shape[0]
    radii = torch.empty(n, dtype=torch.float32, device=feats.device)
    for r0 in range(0, n, block):
        rows = feats[r0 : r0 + block]
        smallest = None  # (rows, <= k+1): the smallest distances seen so far, self included
        for c0 in range(0, n, block):
            d = pairwise_distances(rows, feats[c0 : c0 + block], distance_dtype)
            if smallest is not None:
                d = torch.cat([smallest, d], dim=1)
            smallest = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False, sorted=False).values
        assert smallest is not None and smallest.shape[1] == k + 1
        radii[r0 : r0 + rows.shape[0]] = smallest.max(dim=1).values  # the (k+1)-th smallest
    return radii


def manifold_radii(
    features,
    k: int = ADM_K,
    block: int = 10_000,
    device: str | torch.device = "cpu",
    distance_dtype: str = "float32",
) -> np.ndarray:
    """float32 (N,) radii of the k-NN balls of ``features`` (N, D): the (k+1)-th smallest squared distance from
    each point to the set, itself included (ADM ``ManifoldEstimator.manifold_radii``)."""
    _check(k, block, distance_dtype)
    feats = _features(features, "manifold")
    if feats.shape[0] <= k:
        raise ValueError(f"k={k} nearest-neighbour radii need more than {k} samples, got {feats.shape[0]}")
    with full_precision_matmuls():
        return _radii(feats.to(device), k, block, distance_dtype).cpu().numpy()


@torch.no_grad()
def precision_recall(
    real,
    fake,
    k: int = ADM_K,
    block: int = 10_000,
    device: str | torch.device = "cpu",
    distance_dtype: str = "float32",
) -> tuple[float, float]:
    """(precision, recall) of generated features ``fake`` (M, D) against real features ``real`` (N, D), e.g.
    Inception pool3 activations of the samples and of the ADM reference batch's ``arr_0`` images.

    precision: fraction of ``fake`` inside at least one real k-NN ball (distance ``<=`` radius); recall: fraction
    of ``real`` inside at least one generated ball. Numpy arrays or tensors; computed on ``device``."""
    _check(k, block, distance_dtype)
    real_t, fake_t = _features(real, "real"), _features(fake, "generated")
    if real_t.shape[1] != fake_t.shape[1]:
        raise ValueError(
            f"real features have {real_t.shape[1]} dimensions but generated ones {fake_t.shape[1]}: "
            "they must come from the same feature extractor"
        )
    for what, t in (("real", real_t), ("generated", fake_t)):
        if t.shape[0] <= k:
            raise ValueError(
                f"precision/recall with k={k} needs more than {k} {what} samples, got {t.shape[0]}"
            )
    real_t, fake_t = real_t.to(device), fake_t.to(device)
    with full_precision_matmuls():
        radii_real = _radii(real_t, k, block, distance_dtype)
        radii_fake = _radii(fake_t, k, block, distance_dtype)
        real_in = torch.zeros(real_t.shape[0], dtype=torch.bool, device=real_t.device)
        fake_in = torch.zeros(fake_t.shape[0], dtype=torch.bool, device=real_t.device)
        # Rows real, columns generated: ADM's evaluate_pr orientation (features_1 = the reference batch).
        for r0 in range(0, real_t.shape[0], block):
            rows, rad_rows = real_t[r0 : r0 + block], radii_real[r0 : r0 + block]
            for c0 in range(0, fake_t.shape[0], block):
                d = pairwise_distances(rows, fake_t[c0 : c0 + block], distance_dtype)
                fake_in[c0 : c0 + d.shape[1]] |= (d <= rad_rows[:, None]).any(dim=0)
                real_in[r0 : r0 + d.shape[0]] |= (d <= radii_fake[None, c0 : c0 + d.shape[1]]).any(dim=1)
    precision = int(fake_in.sum()) / fake_in.numel()
    recall = int(real_in.sum()) / real_in.numel()
    return precision, recall
