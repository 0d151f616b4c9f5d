"""``tokscale bench quantizer``: milliseconds of the nearest-code search, the quantizer and its entropy loss (JSON).

    tokscale bench quantizer                                   # N = 512 and 65,536, K = 16384, d = 8
    tokscale bench quantizer --n 512 8192 --compare-reference --repeats 5
    tokscale bench quantizer --device cuda --n 65536 262144

For every N (rows: a batch of 256 images of 256 tokens is 65,536) it times, in fp32:

- ``search``: :func:`~tokscale.tokenizers.quantizer.nearest_code` alone (forward; it has no backward);
- ``quantizer``: the :class:`~tokscale.tokenizers.quantizer.VectorQuantizer` in training mode without the entropy
  loss, forward and backward (rotation trick, commitment and codebook losses, usage tracking);
- ``quantizer_entropy``: the same with the entropy loss (weight 0.005, temperature 0.01), forward and backward;
- ``entropy_ratio``: quantizer_entropy / quantizer.

On a CPU the entropy loss runs in the fused C kernel (tokenizers/entropy_kernel.c) when this machine can compile
it (``entropy_kernel`` in the JSON says which); ``quantizer_entropy_pytorch`` and ``entropy_ratio_pytorch`` then
time the same quantizer on the PyTorch slices (``TOKSCALE_NATIVE=0``), side by side.

``--compare-reference`` also times the implementation that the chunked one replaced (:func:`nearest_code_reference`,
:func:`entropy_loss_reference`, kept here verbatim; the tests compare against them) inside the same quantizer, as
``*_reference``. The variants run round-robin, one call each per repeat, so that a change in the machine's load
falls on all of them alike; ``ms`` is the median over the repeats. Peak memory: CUDA ``max_memory_allocated``
per variant; on a CPU the process's ``ru_maxrss`` after the variant first ran (it only grows: the variants run
from the smallest N up, the new code before the reference, so a variant that needs more than those before it
shows as an increase).

On a CPU that other jobs share, time with ``--threads 1``: the sliced loops run ~25 small kernels per 16-row slice,
and every multi-threaded kernel waits at a barrier for a thread the OS may have descheduled (measured on a 2-core
machine at load ~10: the search 75 ms at 2 threads vs 16 ms at one, N = 512).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from contextlib import contextmanager
from unittest import mock

import torch
import torch.nn.functional as F

from tokscale.devices import device_name, resolve_device, synchronize
from tokscale.native import NATIVE_ENV
from tokscale.tokenizers import quantizer as quantizer_module
from tokscale.tokenizers.quantizer import QuantizerConfig, VectorQuantizer, nearest_code

ENTROPY_WEIGHT = 0.005  # the billion-scale presets' weight (REFERENCE: XL-XXL)


def nearest_code_reference(z_ND: torch.Tensor, codes_KD: torch.Tensor, chunk: int):
    """The search before issue 15: one addmm per chunk of ``chunk`` rows (kept for the comparison)."""
    z = z_ND.float()
    codes = codes_KD.float()
    code_sq = codes.pow(2).sum(1)
    idx_out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    dist_out = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
    for start in range(0, z.shape[0], chunk):
        zc = z[start : start + chunk]
        d = torch.addmm(code_sq.unsqueeze(0), zc, codes.t(), beta=1.0, alpha=-2.0)
        d += zc.pow(2).sum(1, keepdim=True)
        dist, idx = d.min(dim=1)
        idx_out[start : start + chunk] = idx
        dist_out[start : start + chunk] = dist
    return idx_out, dist_out


def entropy_loss_reference(z_ND: torch.Tensor, codes_KD: torch.Tensor, temperature: float, chunk: int):
    """The entropy loss before issue 15: chunked forward, but autograd keeps every chunk's (rows, K) probabilities
    (memory N x K) and log_softmax, exp and the product are three passes each way. Kept verbatim: the tests
    check the new one against it (values and gradients) and ``--compare-reference`` times it."""
    z = z_ND.float()
    codes = codes_KD.float()
    code_sq = codes.pow(2).sum(1)
    sample_entropy = z.new_zeros(())
    prob_sum = z.new_zeros(codes.shape[0])
    for start in range(0, z.shape[0], chunk):
        zc = z[start : start + chunk]
        d = torch.addmm(code_sq.unsqueeze(0), zc, codes.t(), beta=1.0, alpha=-2.0) + zc.pow(2).sum(
            1, keepdim=True
        )
        logp = F.log_softmax(-d / temperature, dim=1)
        p = logp.exp()
        sample_entropy = sample_entropy - (p * logp).sum()
        prob_sum = prob_sum + p.sum(0)
    n = z.shape[0]
    avg_p = prob_sum / n
    batch_entropy = -(avg_p * torch.log(avg_p + 1e-5)).sum()
    return sample_entropy / n - batch_entropy


def _search_with_entropy_reference(z_ND, codes_KD, temperature, chunk):
    idx, dist = nearest_code_reference(z_ND.detach(), codes_KD.detach(), chunk)
    return idx, dist, entropy_loss_reference(z_ND, codes_KD, temperature, chunk)


@contextmanager
def reference_quantizer():
    """The VectorQuantizer running on the replaced search and entropy loss (its forward is otherwise unchanged)."""
    with (
        mock.patch.object(quantizer_module, "nearest_code", nearest_code_reference),
        mock.patch.object(quantizer_module, "search_with_entropy", _search_with_entropy_reference),
    ):
        yield


def _variants(n: int, args: argparse.Namespace, device: torch.device) -> dict:
    """name -> a call that runs the variant once."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, n, args.dim, generator=g).to(device).requires_grad_()
    grad_q = torch.randn(1, n, args.dim, generator=g).to(device)  # the decoder's gradient on z_q
    quantizers = {}
    for weight in (0.0, ENTROPY_WEIGHT):
        cfg = QuantizerConfig(
            codebook_size=args.codebook,
            code_dim=args.dim,
            entropy_weight=weight,
            search_chunk=args.chunk,
            usage_window=max(n, 1),
        )
        torch.manual_seed(0)
        quantizers[weight] = VectorQuantizer(cfg).to(device).train()
    codes = quantizers[0.0].codes().detach()

    def step(vq: VectorQuantizer, reference: bool, pytorch: bool = False):
        def fwd_bwd():
            z.grad = None
            vq.zero_grad(set_to_none=True)
            if reference:
                with reference_quantizer():
                    out = vq(z)
            else:
                out = vq(z)
            loss = (out["z_q"] * grad_q).sum() + out["loss_commit"] + out["loss_codebook"]
            if "loss_entropy" in out:
                loss = loss + out["loss_entropy"]
            loss.backward()

        def call():
            if pytorch:  # forward and backward both on the PyTorch slices
                with mock.patch.dict(os.environ, {NATIVE_ENV: "0"}):
                    fwd_bwd()
            else:
                fwd_bwd()

        return call

    def search(fn):
        def call():
            with torch.no_grad():
                fn(z.detach().reshape(-1, args.dim), codes, args.chunk)

        return call

    out = {
        "search": search(nearest_code),
        "quantizer": step(quantizers[0.0], False),
        "quantizer_entropy": step(quantizers[ENTROPY_WEIGHT], False),
    }
    if _native_entropy(device, args.dim):
        out["quantizer_entropy_pytorch"] = step(quantizers[ENTROPY_WEIGHT], False, pytorch=True)
    if args.compare_reference and (args.reference_max_n is None or n <= args.reference_max_n):
        out.update(
            search_reference=search(nearest_code_reference),
            quantizer_reference=step(quantizers[0.0], True),
            quantizer_entropy_reference=step(quantizers[ENTROPY_WEIGHT], True),
        )
    return out


def _native_entropy(device: torch.device, dim: int) -> bool:
    return quantizer_module._entropy_kernel(device, dim) is not None


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bench_quantizer(args: argparse.Namespace) -> dict:
    for key in ("codebook", "dim", "chunk", "repeats"):
        if getattr(args, key) <= 0:
            raise ValueError(f"--{key} must be positive, got {getattr(args, key)}")
    if not args.n or any(n <= 0 for n in args.n):
        raise ValueError(f"--n must be positive row counts, got {args.n}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    device = resolve_device(args.device)
    if args.threads is not None:
        if args.threads <= 0:
            raise ValueError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    result: dict = {
        "benchmark": "quantizer_fwd_bwd",
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "codebook_size": args.codebook,
        "code_dim": args.dim,
        "search_chunk": args.chunk,
        "entropy_weight": ENTROPY_WEIGHT,
        "entropy_kernel": "native" if _native_entropy(device, args.dim) else "pytorch",
        "repeats": args.repeats,
        "peak_memory": "cuda max_memory_allocated per variant"
        if device.type == "cuda"
        else "process ru_maxrss after the variant's first call (cumulative)",
        "results": {},
    }
    for n in sorted(args.n):
        variants = _variants(n, args, device)
        peaks = {}
        for name, call in variants.items():  # first calls one by one: warmup and peak memory
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(max(1, args.warmup)):
                call()
            synchronize(device)
            peaks[name] = round(_peak_mb(device), 1)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, call in variants.items():
                synchronize(device)
                t0 = time.perf_counter()
                call()
                synchronize(device)
                times[name].append((time.perf_counter() - t0) * 1000)
        row = {
            name: {
                "ms": round(statistics.median(ts), 3),
                "ms_min": round(min(ts), 3),
                "peak_memory_mb": peaks[name],
            }
            for name, ts in times.items()
        }
        row["entropy_ratio"] = round(row["quantizer_entropy"]["ms"] / row["quantizer"]["ms"], 3)
        if "quantizer_entropy_pytorch" in row:
            row["entropy_ratio_pytorch"] = round(
                row["quantizer_entropy_pytorch"]["ms"] / row["quantizer"]["ms"], 3
            )
        if "quantizer_entropy_reference" in row:
            row["entropy_ratio_reference"] = round(
                row["quantizer_entropy_reference"]["ms"] / row["quantizer_reference"]["ms"], 3
            )
            row["entropy_speedup"] = round(
                row["quantizer_entropy_reference"]["ms"] / row["quantizer_entropy"]["ms"], 3
            )
        result["results"][str(n)] = row
    return result
