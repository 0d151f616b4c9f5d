"""The sliced search + entropy loss (issue 15) against the implementation it replaced: same values and gradients
(1e-5 relative), same indices, and autograd no longer keeps the (N, K) probabilities. The value and gradient
cases run both CPU paths: the fused C kernel (tokenizers/entropy_kernel.c) and the PyTorch slices."""

import argparse
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from tokscale.cli import main as cli_main
from tokscale.native import NATIVE_ENV
from tokscale.tokenizers import quantizer as quantizer_module
from tokscale.tokenizers import quantizer_bench
from tokscale.tokenizers.quantizer import (
    QuantizerConfig,
    VectorQuantizer,
    entropy_loss,
    nearest_code,
    search_with_entropy,
)
from tokscale.tokenizers.quantizer_bench import entropy_loss_reference, nearest_code_reference


@pytest.fixture(params=["native", "pytorch"])
def entropy_path(request, monkeypatch):
    """Runs the test on the C kernel, then on the PyTorch slices (TOKSCALE_NATIVE=0)."""
    if request.param == "pytorch":
        monkeypatch.setenv(NATIVE_ENV, "0")
    else:
        monkeypatch.delenv(NATIVE_ENV, raising=False)
        monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
        if shutil.which("cc") is None:
            pytest.skip("no C compiler on this machine: only the PyTorch path exists here")
    kernel = quantizer_module._entropy_kernel(torch.device("cpu"), 8)
    assert (kernel is not None) == (request.param == "native")  # the path asked for is the one that runs
    return request.param


def _value_and_grads(fn, z_raw, w_raw, temperature, chunk, l2_norm):
    """fn's loss and its gradients on the raw z and codebook weights (through F.normalize when l2_norm, as the
    quantizer does)."""
    z_raw = z_raw.clone().requires_grad_()
    w_raw = w_raw.clone().requires_grad_()
    z = F.normalize(z_raw, dim=-1) if l2_norm else z_raw
    codes = F.normalize(w_raw, dim=-1) if l2_norm else w_raw
    loss = fn(z, codes, temperature, chunk)
    loss.backward()
    return loss.detach(), z_raw.grad, w_raw.grad


def _assert_close_to(new, ref, rel=1e-5):
    """Elementwise within rel of the reference, or within rel of the reference's largest entry (gradient entries
    near zero are sums that cancel: their fp32 rounding is relative to the terms, not to the result)."""
    torch.testing.assert_close(new, ref, rtol=rel, atol=rel * float(ref.abs().max()))


@pytest.mark.parametrize(
    "n, k, d, temperature, chunk, l2_norm",
    [
        (50, 16, 8, 0.05, 7, True),  # N not a multiple of the chunk
        (300, 64, 4, 0.5, 1, False),  # one row per slice
        (77, 300, 8, 0.1, 1000, False),  # one slice larger than N
        # GigaTok's temperature: most logits (d - d_min) / T fall below the floor -60; 6 slices, the last of 13 rows
        (513, 2048, 8, 0.01, 100, True),
        (300, 4096, 8, 0.01, 333, True),  # chunk above the CPU slice (64 rows per thread at K = 4096)
        (64, 512, 8, 0.01, 5, False),
    ],
)
def test_entropy_loss_equals_the_replaced_implementation_in_value_and_both_gradients(
    n, k, d, temperature, chunk, l2_norm, entropy_path
):
    # (Where |d| / T is large, as for unnormalised inputs of norm ~8 at T = 0.01, the fp32 logits themselves are
    # only good to ~1e-3 in both implementations: the cases keep to inputs whose fp32 answer is good to 1e-5.)
    torch.manual_seed(n + k)
    z, w = torch.randn(n, d), torch.randn(k, d)
    new = _value_and_grads(entropy_loss, z, w, temperature, chunk, l2_norm)
    ref = _value_and_grads(entropy_loss_reference, z, w, temperature, chunk, l2_norm)
    for got, want in zip(new, ref):
        assert got.abs().max() > 0  # the codes get a gradient too, not only z
        _assert_close_to(got, want)


def test_the_kernel_splits_rows_over_the_intra_op_threads_with_the_same_result(entropy_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        if entropy_path == "native":
            assert len(quantizer_module._EntropyKernel._row_parts(1030)) == 3  # 3 row ranges of >= 256 rows
        torch.manual_seed(7)
        z, w = torch.randn(1030, 8), torch.randn(2048, 8)
        new = _value_and_grads(entropy_loss, z, w, 0.01, 16384, True)
        ref = _value_and_grads(entropy_loss_reference, z, w, 0.01, 16384, True)
    finally:
        torch.set_num_threads(threads)
    for got, want in zip(new, ref):
        _assert_close_to(got, want)


def test_fused_search_gives_the_indices_of_the_search_and_of_the_replaced_search(entropy_path):
    torch.manual_seed(4)
    z = F.normalize(torch.randn(1111, 8), dim=-1)
    codes = F.normalize(torch.randn(4096, 8), dim=-1)
    idx, dist = nearest_code(z, codes, chunk=97)
    idx_fused, dist_fused, _ = search_with_entropy(z, codes, 0.01, chunk=97)
    idx_ref, dist_ref = nearest_code_reference(z, codes, chunk=97)
    assert torch.equal(idx_fused, idx) and torch.equal(dist_fused, dist)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(dist, dist_ref, rtol=0, atol=2e-6)
    assert torch.equal(idx, torch.cdist(z.double(), codes.double()).argmin(1))


def _saved_floats(fn, *args) -> int:
    """Floats that autograd keeps for the backward of fn(*args)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return total


def test_autograd_keeps_o_of_n_plus_k_floats_where_the_replaced_loss_kept_n_times_k():
    n, k, d = 600, 1024, 8
    z = F.normalize(torch.randn(n, d), dim=-1).requires_grad_()
    codes = F.normalize(torch.randn(k, d), dim=-1).requires_grad_()
    new = _saved_floats(entropy_loss, z, codes, 0.01, 128)
    ref = _saved_floats(entropy_loss_reference, z, codes, 0.01, 128)
    assert new <= (n + k) * d + 3 * n + k  # z, codes, per-row dist / Z / sbar, the batch mean
    assert ref >= n * k


def test_entropy_loss_runs_in_fp32_under_bf16_autocast():
    torch.manual_seed(5)
    z = F.normalize(torch.randn(40, 8), dim=-1)
    codes = F.normalize(torch.randn(256, 8), dim=-1)
    want = entropy_loss(z, codes, 0.01, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = entropy_loss(z, codes, 0.01, 16)
    assert got.dtype == torch.float32
    assert torch.equal(got, want)


def test_quantizer_with_entropy_gives_the_losses_and_gradients_of_the_replaced_one(entropy_path):
    torch.manual_seed(6)
    with_entropy = VectorQuantizer(
        QuantizerConfig(codebook_size=512, code_dim=8, entropy_weight=0.005, search_chunk=100)
    ).train()
    # the replaced entropy term added by hand to the same quantizer without its own entropy term
    without = VectorQuantizer(QuantizerConfig(codebook_size=512, code_dim=8, search_chunk=100)).train()
    without.load_state_dict(with_entropy.state_dict())
    x, g = torch.randn(3, 70, 8), torch.randn(3, 70, 8)

    def run(vq, reference):
        z = x.clone().requires_grad_()
        out = vq(z)
        if reference:
            flat = F.normalize(z, dim=-1).reshape(-1, 8)
            entropy = 0.005 * entropy_loss_reference(flat, vq.codes(), 0.01, 100)
        else:
            entropy = out["loss_entropy"]
        loss = (out["z_q"] * g).sum() + out["loss_commit"] + out["loss_codebook"] + entropy
        loss.backward()
        return out["indices"], entropy.detach(), z.grad, vq.codebook.weight.grad

    new, ref = run(with_entropy, False), run(without, True)
    assert torch.equal(new[0], ref[0])
    for got, want in zip(new[1:], ref[1:]):
        _assert_close_to(got, want)


def test_bench_quantizer_prints_the_three_timings_the_ratio_and_the_reference(capsys):
    rc = cli_main(
        "bench quantizer --n 40 100 --codebook 256 --dim 8 --chunk 32 --repeats 1 --warmup 1 "
        "--device cpu --compare-reference --reference-max-n 40".split()
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["device"] == "cpu" and out["codebook_size"] == 256 and out["threads"] >= 1
    small, large = out["results"]["40"], out["results"]["100"]
    for row in (small, large):
        for name in ("search", "quantizer", "quantizer_entropy"):
            assert row[name]["ms"] > 0 and row[name]["peak_memory_mb"] > 0
        assert row["entropy_ratio"] == pytest.approx(
            row["quantizer_entropy"]["ms"] / row["quantizer"]["ms"], rel=1e-2
        )
    assert small["quantizer_entropy_reference"]["ms"] > 0 and "entropy_speedup" in small
    assert "quantizer_entropy_reference" not in large  # above --reference-max-n


@pytest.mark.skipif(
    shutil.which("cc") is None, reason="no C compiler: the bench has no PyTorch variant to add"
)
def test_bench_quantizer_times_the_pytorch_slices_forward_and_backward_beside_the_kernel(monkeypatch):
    monkeypatch.delenv(NATIVE_ENV, raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    calls = []
    for name in ("forward", "backward"):
        real = getattr(quantizer_module._EntropyKernel, name)
        monkeypatch.setattr(
            quantizer_module._EntropyKernel,
            name,
            lambda self, *a, _real=real, _name=name: calls.append(_name) or _real(self, *a),
        )
    args = argparse.Namespace(codebook=256, dim=8, chunk=32, compare_reference=False, reference_max_n=None)
    variants = quantizer_bench._variants(40, args, torch.device("cpu"))
    variants["quantizer_entropy"]()
    assert calls == ["forward", "backward"]
    calls.clear()
    variants["quantizer_entropy_pytorch"]()
    assert calls == []  # neither pass went through the kernel


def test_bench_quantizer_refuses_a_bad_size(capsys):
    assert cli_main("bench quantizer --n 40 --codebook 0 --device cpu".split()) != 0
    assert "--codebook must be positive, got 0" in capsys.readouterr().err
