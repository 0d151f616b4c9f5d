import math

import pytest
import torch
import torch.nn.functional as F

from tokscale.tokenizers.quantizer import (
    QuantizerConfig,
    VectorQuantizer,
    entropy_loss,
    nearest_code,
    rotate_to,
)
from tokscale.tokenizers.quantizer import _row_min as row_min


def make_vq(**kw):
    torch.manual_seed(0)
    return VectorQuantizer(QuantizerConfig(**{"codebook_size": 64, "code_dim": 8, **kw}))


def test_chunked_search_equals_unchunked_search():
    torch.manual_seed(1)
    z = torch.randn(1000, 8)
    codes = F.normalize(torch.randn(300, 8), dim=-1)
    idx_chunked, dist_chunked = nearest_code(z, codes, chunk=37)
    idx_full, dist_full = nearest_code(z, codes, chunk=10**6)
    reference = torch.cdist(z.double(), codes.double()).pow(2).argmin(1)
    assert torch.equal(idx_chunked, idx_full)
    assert torch.equal(idx_full, reference)
    assert torch.allclose(dist_chunked, dist_full)


@pytest.mark.parametrize("k", [100, 256, 300, 16384])  # one level, two whole blocks, a tail block, 128 blocks
def test_two_level_row_minimum_equals_torch_min_with_its_first_index_on_ties(k):
    torch.manual_seed(k)
    d = torch.randint(0, 40, (33, k)).float()  # small integers: every row has many exact ties
    d[0] = 5.0  # a constant row: index 0
    d[1, -1] = -1.0  # the minimum in the last (tail) column
    d[2, [7, k - 2]] = -3.0  # a tie across blocks: the first one
    val, idx = torch.empty(33), torch.empty(33, dtype=torch.long)
    row_min(d, val, idx)
    want_val, want_idx = torch.min(d, dim=1)
    assert torch.equal(val, want_val) and torch.equal(idx, want_idx)
    assert idx[0] == 0 and idx[1] == k - 1 and idx[2] == 7
    assert torch.equal(d[torch.arange(33), idx], val)
    first = (d == val.unsqueeze(1)).float().argmax(1)  # the first column equal to the minimum
    assert torch.equal(idx, first)


def test_search_runs_in_fp32_for_bf16_inputs():
    vq = make_vq().to(torch.bfloat16)
    z = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    out = vq(z)
    codes = vq.codes()
    assert codes.dtype == torch.float32
    expected = torch.cdist(F.normalize(z.float(), dim=-1).reshape(-1, 8), codes).argmin(1)
    assert torch.equal(out["indices"].reshape(-1), expected)
    assert out["z_q"].dtype == torch.bfloat16


def test_output_equals_the_normalised_nearest_code():
    vq = make_vq()
    z = torch.randn(3, 4, 8)
    out = vq(z)
    assert torch.allclose(out["z_q"], vq.codes()[out["indices"]], atol=1e-6)
    assert torch.allclose(out["z_q"].norm(dim=-1), torch.ones(3, 4), atol=1e-5)


def test_straight_through_passes_the_output_gradient_to_the_encoder_unchanged():
    vq = make_vq(l2_norm=False, rotation_trick=False)
    z = torch.randn(2, 3, 8, requires_grad=True)
    g = torch.randn(2, 3, 8)
    (vq(z)["z_q"] * g).sum().backward()
    assert torch.allclose(z.grad, g)
    assert vq.codebook.weight.grad is None or vq.codebook.weight.grad.abs().sum() == 0


def test_commitment_loss_reaches_only_the_encoder_and_codebook_loss_only_the_codebook():
    vq = make_vq(beta=0.25, codebook_weight=1.0)
    z = torch.randn(2, 3, 8, requires_grad=True)
    out = vq(z)
    out["loss_commit"].backward(retain_graph=True)
    assert z.grad.abs().sum() > 0
    assert vq.codebook.weight.grad is None or vq.codebook.weight.grad.abs().sum() == 0
    z.grad = None
    out["loss_codebook"].backward()
    assert z.grad is None or z.grad.abs().sum() == 0
    assert vq.codebook.weight.grad.abs().sum() > 0


def test_rotation_trick_returns_the_code_and_rotates_the_gradient():
    torch.manual_seed(2)
    z = torch.randn(5, 8, requires_grad=True)
    z_q = F.normalize(torch.randn(5, 8), dim=-1)
    out = rotate_to(z, z_q)
    assert torch.allclose(out, z_q, atol=1e-5)
    g = torch.randn(5, 8)
    (out * g).sum().backward()
    # the gradient is a rotation of g scaled by |z_q| / |z|: its norm changes by exactly that factor
    ratio = z.grad.norm(dim=-1) / g.norm(dim=-1)
    assert torch.allclose(ratio, z_q.norm(dim=-1) / z.detach().norm(dim=-1), atol=1e-5)
    assert not torch.allclose(z.grad, g)


def test_entropy_loss_matches_its_formula_and_is_chunk_independent():
    torch.manual_seed(3)
    z = F.normalize(torch.randn(50, 8), dim=-1)
    codes = F.normalize(torch.randn(16, 8), dim=-1)
    t = 0.05
    d = torch.cdist(z.double(), codes.double()).pow(2)
    p = torch.softmax(-d / t, dim=1)
    per_sample = -(p * p.log()).sum(1).mean()
    avg = p.mean(0)
    expected = per_sample - (-(avg * avg.log()).sum())
    assert math.isclose(
        entropy_loss(z, codes, t, chunk=7).item(), expected.item(), rel_tol=1e-4, abs_tol=1e-5
    )
    assert math.isclose(
        entropy_loss(z, codes, t, chunk=1000).item(), expected.item(), rel_tol=1e-4, abs_tol=1e-5
    )


def test_entropy_loss_is_lowest_for_confident_assignments_spread_over_the_codebook():
    codes = torch.eye(8)
    spread = torch.eye(8)  # each sample exactly on a different code
    collapsed = torch.eye(8)[[0] * 8]  # every sample on code 0
    assert entropy_loss(spread, codes, 0.01, 64) < entropy_loss(collapsed, codes, 0.01, 64)
    assert entropy_loss(spread, codes, 0.01, 64).item() < -math.log(8) + 1e-3


def test_entropy_loss_is_added_only_when_weighted_and_training():
    vq = make_vq(entropy_weight=0.005)
    z = torch.randn(2, 3, 8)
    assert "loss_entropy" in vq(z)
    vq.eval()
    assert "loss_entropy" not in vq(z)
    assert "loss_entropy" not in make_vq()(z)


def test_usage_window_counts_unique_codes_over_the_last_indices():
    vq = make_vq(codebook_size=16, usage_window=8)
    vq._record_usage(torch.tensor([0, 1, 2, 3]))
    assert vq.usage_stats()["codebook_usage"] == 4 / 16
    vq._record_usage(torch.tensor([5] * 8))  # pushes everything else out of the window
    stats = vq.usage_stats()
    assert stats["codebook_usage"] == 1 / 16
    assert math.isclose(stats["codebook_perplexity"], 1.0)
