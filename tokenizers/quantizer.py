"""Vector quantizer with l2-normalised low-dimensional codes (GigaTok / ViT-VQGAN style).

Shapes: ``z_BLD`` are B sequences of L vectors of the code dimension D; the codebook is (K, D).
The nearest-code search always runs in fp32, even when the engine holds the model in bf16 (a bf16 distance
to 16384 unit vectors in 8 dimensions cannot separate neighbours, and autocast is switched off around it), and in
row slices so that the (rows, K) distance matrix stays bounded for large batch x codebook. With the entropy loss on,
the search and the loss share one pass over the slices (:func:`search_with_entropy`), and the loss's backward
recomputes its slices instead of keeping the (N, K) probabilities: memory O(slice + N + K) both ways.
The row minimum is two-level (:func:`_row_min`): the search is 16 % faster than with torch.min at N = 65,536,
K = 16384 on one CPU thread. On a CPU the entropy loss's own work (the softmax sums forward, the two contractions
backward) runs in a fused C kernel, tokenizers/entropy_kernel.c, compiled for the machine at first use
(tokscale.native; ``TOKSCALE_NATIVE=0`` or no C compiler keeps the PyTorch slices, which remain the GPU's path):
one pass over cache-sized blocks where the slices make a dozen over memory. ``tokscale bench quantizer`` times it
against the quantizer without the entropy loss and against the PyTorch slices (figures in the README).
"""

from __future__ import annotations

import ctypes
import functools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tokscale.native import load_kernel


@dataclass
class QuantizerConfig:
    codebook_size: int = 16384
    code_dim: int = 8
    l2_norm: bool = True
    beta: float = 0.25  # commitment weight
    codebook_weight: float = 1.0
    rotation_trick: bool = True  # gradient estimator: rotation trick (GigaTok's default) or straight-through
    entropy_weight: float = 0.0  # 0.005 for the billion-scale XL-XXL tokenizer
    entropy_temperature: float = 0.01
    usage_window: int = 65536  # codebook usage over the last this many indices
    search_chunk: int = 16384  # rows of z per distance chunk: memory is search_chunk x codebook_size floats
    # "vq": one code per grid token; "multiscale": VAR's residual quantization over `scales` (2D tokenizers only,
    # the last scale the token grid side; tokscale.tokenizers.multiscale)
    kind: str = "vq"
    scales: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 8, 10, 13, 16])  # 680 tokens
    phi_count: int = 4  # 3x3 convolutions shared between the scales (VAR's share_quant_resi)
    phi_mix: float = 0.5  # phi(h) = (1 - phi_mix) h + phi_mix conv(h) (VAR's quant_resi); 0 = identity

    def __post_init__(self):
        for key in ("codebook_size", "code_dim", "usage_window", "search_chunk"):
            if getattr(self, key) <= 0:
                raise ValueError(f"quantizer.{key} must be positive, got {getattr(self, key)}")
        if self.kind not in ("vq", "multiscale"):
            raise ValueError(f"quantizer.kind must be 'vq' or 'multiscale', got {self.kind!r}")
        s = list(self.scales)
        if not s or s[0] < 1 or any(b <= a for a, b in zip(s, s[1:])):
            raise ValueError(f"quantizer.scales must be strictly increasing positive sides, got {s}")
        if self.phi_count < 1:
            raise ValueError(f"quantizer.phi_count must be >= 1, got {self.phi_count}")
        if not 0.0 <= self.phi_mix <= 1.0:
            raise ValueError(f"quantizer.phi_mix must be in [0, 1], got {self.phi_mix}")
        if self.entropy_temperature <= 0:
            raise ValueError(f"quantizer.entropy_temperature must be > 0, got {self.entropy_temperature}")


# Rows per slice on a CPU are cut further so that each thread's share of a slice, 2^18 floats (1 MiB), stays in its
# core's L2 cache: the dozen elementwise passes over a slice then run several times faster than over a slice that
# streams from memory (measured, one thread, K = 16384: 16 rows per slice ~2x faster than 2048). On a GPU the
# configured chunk is the slice (fewer, larger kernels).
CPU_SLICE_FLOATS = 1 << 18


def _slice_rows(chunk: int, num_codes: int, device: torch.device) -> int:
    if chunk <= 0:
        raise ValueError(f"chunk (rows of z per distance slice) must be positive, got {chunk}")
    if device.type == "cpu":
        return max(1, min(chunk, CPU_SLICE_FLOATS * torch.get_num_threads() // num_codes))
    return chunk


def _distance_operands(z: torch.Tensor, codes: torch.Tensor):
    """(-2 codes^T contiguous (D, K), ||codes||^2 (K,), ||z||^2 (N,)) for :func:`_distances`."""
    return (-2.0 * codes).t().contiguous(), codes.pow(2).sum(1), z.pow(2).sum(1)


def _distances(zc: torch.Tensor, codes_m2_DK: torch.Tensor, code_sq: torch.Tensor, zc_sq: torch.Tensor, out):
    """out[i, j] = ||e_j||^2 - 2 z_i.e_j + ||z_i||^2, with codes_m2_DK = -2 codes^T (contiguous).

    The -2 is folded into the codes (exact in floating point) so that the matmul reads a contiguous (D, K) operand:
    at 16 rows it takes half the time of addmm(||e||^2, z, codes^T, alpha=-2). Both round the same way up to the
    matmul's own row blocking (MKL's result for a row can change in the last bit with the number of rows).
    (Folding ||e||^2 into the matmul and leaving out ||z||^2, a row constant, saves the two adds: 11 % of the entropy
    loss's time and 27 % of the search's, measured side by side on one thread. But it rounds the logits
    (d_min - d) / T differently by ~1e-5 at T = 0.01, which moves the trainer's fixed-seed losses, so the sums
    stay as they were.)"""
    torch.mm(zc, codes_m2_DK, out=out)
    out += code_sq
    out += zc_sq.unsqueeze(1)
    return out


# Columns per block of the two-level row minimum (a power of two; K = 16384 is 128 blocks).
MIN_BLOCK = 128


def _row_min(d: torch.Tensor, out_val: torch.Tensor, out_idx: torch.Tensor) -> None:
    """out_val, out_idx = torch.min(d, dim=1), the first index of each row's minimum, in two levels: the blocks'
    minima (a reduction without indices, vectorised), the first block holding the row's minimum, then the first
    index inside that block. Measured at 16 x 16384 on one CPU thread: 46 us against 110 us for torch.min with
    indices; the same values and indices (ties go to the lowest index in both: tests/tokenizers/test_quantizer.py)."""
    m, k = d.shape
    nb = k // MIN_BLOCK
    if nb < 2:
        torch.min(d, dim=1, out=(out_val, out_idx))
        return
    block_min = d[:, : nb * MIN_BLOCK].unfold(1, MIN_BLOCK, MIN_BLOCK).amin(-1)
    if k > nb * MIN_BLOCK:  # the tail columns are one more, shorter block
        block_min = torch.cat([block_min, d[:, nb * MIN_BLOCK :].amin(1, keepdim=True)], dim=1)
    start = torch.min(block_min, dim=1, out=(out_val, out_idx))[1].mul_(MIN_BLOCK)
    cols = start.unsqueeze(1) + torch.arange(MIN_BLOCK, device=d.device)
    if k > nb * MIN_BLOCK:
        cols.clamp_max_(k - 1)  # the tail block's columns past K repeat column K - 1, never before its first
    torch.add(start, d.gather(1, cols).argmin(1), out=out_idx)


def nearest_code(z_ND: torch.Tensor, codes_KD: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and squared distance of the nearest code for every row, in fp32 and row slices of at most ``chunk``
    rows (fewer on a CPU: ``CPU_SLICE_FLOATS``), so that only one (rows, K) distance slice is ever alive."""
    with torch.autocast(z_ND.device.type, enabled=False):
        z = z_ND.float()
        codes = codes_KD.float()
        n, k = z.shape[0], codes.shape[0]
        rows = _slice_rows(chunk, k, z.device)
        codes_m2, code_sq, z_sq = _distance_operands(z, codes)
        idx_out = torch.empty(n, dtype=torch.long, device=z.device)
        dist_out = torch.empty(n, dtype=torch.float32, device=z.device)
        buf = z.new_empty(min(rows, n), k)
        for zc, zc_sq, dist_c, idx_c in zip(*(t.split(rows) for t in (z, z_sq, dist_out, idx_out))):
            _row_min(_distances(zc, codes_m2, code_sq, zc_sq, buf[: zc.shape[0]]), dist_c, idx_c)
    return idx_out, dist_out


# GigaTok's (and LlamaGen's) epsilon inside the log of the batch-mean distribution.
BATCH_ENTROPY_EPS = 1e-5
# Floor of the shifted logits s' = (dist - d) / T (0 at the nearest code): exp(-60) = 9e-27 of the nearest code's
# weight, which no fp32 sum over even 2^40 codes can see, and it keeps exp and the products after it out of the
# denormal range, where x86 CPUs take a slow path (measured: exp ~200x, the matmuls ~100x slower).
LOGIT_FLOOR = -60.0


def _shifted_logits(d: torch.Tensor, dist_t: torch.Tensor, inv_t: float) -> torch.Tensor:
    """In place: d -> max(dist_i / T - d_ij / T, LOGIT_FLOOR), the logits shifted by their row maximum, with
    dist_t = dist / T of shape (rows, 1): one fused multiply-add pass and the floor."""
    return torch.add(dist_t, d, alpha=-inv_t, out=d).clamp_min_(LOGIT_FLOOR)


# Rows per thread below which the C kernel's work is not split over PyTorch's intra-op threads.
KERNEL_ROWS_PER_THREAD = 256


class _EntropyKernel:
    """tokenizers/entropy_kernel.c through ctypes: the entropy loss's forward sums and backward contractions on a
    CPU in one fused pass over cache-sized blocks (same mathematics as :class:`_SearchEntropy`'s slices)."""

    SOURCE = Path(__file__).with_name("entropy_kernel.c")

    def __init__(self, lib: ctypes.CDLL):
        i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
        self.fwd, self.bwd = lib.entropy_forward, lib.entropy_backward
        self.fwd.argtypes = [i64, i64, *[ptr] * 5, f32, f32, *[ptr] * 3]
        self.bwd.argtypes = [i64, i64, *[ptr] * 5, f32, f32, *[ptr] * 6]
        self.fwd.restype = self.bwd.restype = ctypes.c_int

    @staticmethod
    def _operands(z, codes):
        """z, -2 codes^T (D, K), ||codes||^2, ||z||^2: contiguous fp32, as the kernel reads them."""
        z = z.contiguous()
        return (z, *_distance_operands(z, codes))

    @staticmethod
    def _check(rc: int) -> None:
        if rc != 0:
            raise MemoryError("entropy kernel: could not allocate its block buffers")

    @staticmethod
    def _row_parts(n: int) -> list[tuple[int, int]]:
        """Row ranges, one per PyTorch intra-op thread (at least KERNEL_ROWS_PER_THREAD rows each)."""
        parts = max(1, min(torch.get_num_threads(), n // KERNEL_ROWS_PER_THREAD))
        bounds = [round(i * n / parts) for i in range(parts + 1)]
        return list(zip(bounds[:-1], bounds[1:]))

    def _run(self, fn, parts, per_part):
        """fn(*per_part(p, a, b)) for every row range p = (a, b), in threads when several (ctypes releases the
        GIL during the call)."""
        calls = [per_part(p, a, b) for p, (a, b) in enumerate(parts)]
        if len(calls) == 1:
            self._check(fn(*calls[0]))
            return
        with ThreadPoolExecutor(len(calls)) as pool:
            for rc in pool.map(lambda args: fn(*args), calls):
                self._check(rc)

    def forward(self, z, codes, dist, inv_t: float):
        """(Z_i, sum_j e_ij s'_ij, sum_i e_ij / Z_i)."""
        n, k = z.shape[0], codes.shape[0]
        z, codes_m2, code_sq, z_sq = self._operands(z, codes)
        dist = dist.contiguous()
        z_part, s_dot = z.new_empty(n), z.new_empty(n)
        parts = self._row_parts(n)
        col_sums = z.new_zeros(len(parts), k)  # one per thread, added up below

        def args(p, a, b):
            ins = (z[a:b], codes_m2, code_sq, z_sq[a:b], dist[a:b])
            outs = (z_part[a:b], s_dot[a:b], col_sums[p])
            return (b - a, k, *(t.data_ptr() for t in ins), inv_t, LOGIT_FLOOR, *(t.data_ptr() for t in outs))

        self._run(self.fwd, parts, args)
        return z_part, s_dot, col_sums.sum(0)

    def backward(self, z, codes, dist, inv_t: float, g, inv_z, neg_sbar, rhs):
        """(sum_j te_ij (-2 e_j) per row (N, D), acc (D + 1, K)) as :meth:`_SearchEntropy._backward_slices`."""
        n, k, dim = z.shape[0], codes.shape[0], z.shape[1]
        z, codes_m2, code_sq, z_sq = self._operands(z, codes)
        dist, g, inv_z, neg_sbar, rhs = (t.contiguous() for t in (dist, g, inv_z, neg_sbar, rhs))
        grad_z = z.new_empty(n, dim)
        parts = self._row_parts(n)
        accs = z.new_zeros(len(parts), dim + 1, k)

        def args(p, a, b):
            ins = (z[a:b], codes_m2, code_sq, z_sq[a:b], dist[a:b])
            rest = (g, inv_z[a:b], neg_sbar[a:b], rhs[a:b], grad_z[a:b], accs[p])
            return (b - a, k, *(t.data_ptr() for t in ins), inv_t, LOGIT_FLOOR, *(t.data_ptr() for t in rest))

        self._run(self.bwd, parts, args)
        return grad_z, accs.sum(0)


@functools.cache
def _wrap(lib: ctypes.CDLL) -> _EntropyKernel:
    return _EntropyKernel(lib)


def _entropy_kernel(device: torch.device, code_dim: int) -> _EntropyKernel | None:
    """The fused C kernel (compiled once per code dimension) for CPU tensors when this machine can build it and the
    environment allows it (tokscale.native), else None: the PyTorch slices run."""
    if device.type != "cpu":
        return None
    lib = load_kernel(_EntropyKernel.SOURCE, "entropy_kernel", (("CODE_DIM", code_dim),))
    return None if lib is None else _wrap(lib)


class _SearchEntropy(torch.autograd.Function):
    """Nearest-code search and entropy loss in one pass over row slices of the (N, K) distance matrix.

    With s_ij = -d_ij / T, p_i = softmax(s_i) and a = mean_i p_i, the loss is mean_i H(p_i) - H_eps(a), where
    H(p_i) = lse_i - sum_j p_ij s_ij (no log p is formed) and H_eps(a) = -sum_j a_j log(a_j + eps). Each slice's
    logits are shifted by their row maximum -dist_i / T, which the search has just found: s'_ij = (dist_i - d_ij) / T.
    Forward keeps per row only dist, Z_i = sum_j exp(s'_ij) and sbar'_i = sum_j p_ij s'_ij, and per code the column
    sum of p. Backward recomputes each slice's probabilities (it needs the global a first, hence the two passes):
        dL/ds_ij = p_ij (g_j - gbar_i - s'_ij + sbar'_i) / N,  g_j = log(a_j + eps) + a_j / (a_j + eps),
    gbar_i = sum_j p_ij g_j, then ds_ij/dz_i = 2 (e_j - z_i) / T and ds_ij/de_j = 2 (z_i - e_j) / T (the z_i part
    sums to zero over j). Memory: two (rows, K) slices plus O(N + K), forward and backward.
    """

    @staticmethod
    def forward(ctx, z, codes, temperature: float, chunk: int):
        n, k = z.shape[0], codes.shape[0]
        rows = _slice_rows(chunk, k, z.device)
        kernel = _entropy_kernel(z.device, z.shape[1])
        if kernel is not None:  # the search as nearest_code, the rest in the fused C kernel
            idx, dist = nearest_code(z, codes, chunk)
            z_part, s_dot, prob_sum = kernel.forward(z, codes, dist, 1.0 / temperature)
            return _SearchEntropy._finish(
                ctx, z, codes, dist, idx, z_part, s_dot, prob_sum, temperature, rows
            )
        codes_m2, code_sq, z_sq = _distance_operands(z, codes)
        idx = torch.empty(n, dtype=torch.long, device=z.device)
        dist = torch.empty(n, dtype=torch.float32, device=z.device)
        z_part = torch.empty(n, dtype=torch.float32, device=z.device)
        s_dot = torch.empty(n, dtype=torch.float32, device=z.device)  # sum_j exp(s'_ij) s'_ij
        prob_sum = z.new_zeros(k)
        inv_t = 1.0 / temperature
        buf = z.new_empty(min(rows, n), k)
        ebuf = torch.empty_like(buf)
        # views of every per-row tensor, one per slice (slicing inside the loop costs more than the small slices)
        for zc, zc_sq, dist_c, idx_c, zp_c, sd_c in zip(
            *(t.split(rows) for t in (z, z_sq, dist, idx, z_part, s_dot))
        ):
            m = zc.shape[0]
            d = _distances(zc, codes_m2, code_sq, zc_sq, buf[:m])
            _row_min(d, dist_c, idx_c)
            s = _shifted_logits(d, dist_c.unsqueeze(1) * inv_t, inv_t)
            e = torch.exp(s, out=ebuf[:m])
            torch.sum(e, dim=1, out=zp_c)
            torch.sum(s.mul_(e), dim=1, out=sd_c)
            prob_sum.addmv_(e.t(), zp_c.reciprocal())
        return _SearchEntropy._finish(ctx, z, codes, dist, idx, z_part, s_dot, prob_sum, temperature, rows)

    @staticmethod
    def _finish(ctx, z, codes, dist, idx, z_part, s_dot, prob_sum, temperature, rows):
        n = z.shape[0]
        sbar = s_dot / z_part  # sum_j p_ij s'_ij
        sample_entropy = (z_part.log() - sbar).sum()
        avg_p = prob_sum / n
        batch_entropy = -(avg_p * torch.log(avg_p + BATCH_ENTROPY_EPS)).sum()
        loss = sample_entropy / n - batch_entropy
        ctx.save_for_backward(z, codes, dist, z_part, sbar, avg_p)
        ctx.temperature, ctx.rows = temperature, rows
        ctx.mark_non_differentiable(idx, dist)
        return loss, idx, dist

    @staticmethod
    def backward(ctx, grad_loss, _grad_idx, _grad_dist):
        z, codes, dist, z_part, sbar, avg_p = ctx.saved_tensors
        need_z, need_codes = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, dim = z.shape
        rows, inv_t = ctx.rows, 1.0 / ctx.temperature
        g = torch.log(avg_p + BATCH_ENTROPY_EPS) + avg_p / (avg_p + BATCH_ENTROPY_EPS)
        inv_z = z_part.reciprocal()
        # dL/ds_ij = (u_i / (2/T)) t_ij e_ij with e = exp(s'), t = s' - g + c, c_i = gbar_i - sbar'_i
        u = (-2.0 * inv_t / n) * grad_loss * inv_z
        rhs = torch.cat([z * u.unsqueeze(1), u.unsqueeze(1)], dim=1)  # rows of [u_i z_i, u_i]
        kernel = _entropy_kernel(z.device, z.shape[1])
        if kernel is not None:
            grad_z, acc = kernel.backward(z, codes, dist, inv_t, g, inv_z, -sbar, rhs)
        else:
            grad_z, acc = _SearchEntropy._backward_slices(z, codes, dist, inv_t, g, inv_z, sbar, rhs, rows)
        grad_codes = (acc[:dim] - acc[dim:] * codes.t()).t() if need_codes else None
        return grad_z.mul_(-0.5 * u.unsqueeze(1)) if need_z else None, grad_codes, None, None

    @staticmethod
    def _backward_slices(z, codes, dist, inv_t, g, inv_z, sbar, rhs, rows):
        """(sum_j te_ij (-2 e_j) per row, acc): the backward's two contractions, slice by slice in PyTorch."""
        n, dim = z.shape
        codes_m2, code_sq, z_sq = _distance_operands(z, codes)
        grad_z = torch.empty_like(z)
        c_one = z.new_ones(min(rows, n), 2)
        one_neg_g = torch.stack([torch.ones_like(g), -g])
        acc = z.new_zeros(dim + 1, codes.shape[0])  # columns j: [sum_i G_ij z_i ; sum_i G_ij] (2/T)
        buf = z.new_empty(min(rows, n), codes.shape[0])
        ebuf = torch.empty_like(buf)
        for zc, zc_sq, dist_c, inv_z_c, neg_sbar_c, gz_c, rhs_c in zip(
            *(t.split(rows) for t in (z, z_sq, dist.unsqueeze(1) * inv_t, inv_z, -sbar, grad_z, rhs))
        ):
            m = zc.shape[0]
            d = _distances(zc, codes_m2, code_sq, zc_sq, buf[:m])
            s = _shifted_logits(d, dist_c, inv_t)
            e = torch.exp(s, out=ebuf[:m])
            torch.addcmul(neg_sbar_c, torch.mv(e, g), inv_z_c, out=c_one[:m, 0])  # c_i = gbar_i - sbar'_i
            # s' + c_i - g_j in one pass: a rank-2 update [c, 1] @ [1; -g] (one kernel instead of two broadcasts)
            te = s.addmm_(c_one[:m], one_neg_g).mul_(e)
            # te @ codes as (-2 codes^T) @ te^T: MKL is ~1.5x faster on this layout at 16 rows
            gz_c.copy_(torch.mm(codes_m2, te.t()).t())
            acc.addmm_(rhs_c.t(), te)
        return grad_z, acc


def search_with_entropy(
    z_ND: torch.Tensor, codes_KD: torch.Tensor, temperature: float, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index, squared distance, entropy loss): :func:`nearest_code` and :func:`entropy_loss` from one set of
    distance slices, in fp32; the loss backpropagates to z and to the codes."""
    if temperature <= 0:
        raise ValueError(f"entropy temperature must be > 0, got {temperature}")
    with torch.autocast(z_ND.device.type, enabled=False):
        loss, idx, dist = _SearchEntropy.apply(z_ND.float(), codes_KD.float(), float(temperature), int(chunk))
    return idx, dist, loss


def entropy_loss(z_ND: torch.Tensor, codes_KD: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
    """Mean per-sample entropy minus the entropy of the batch-mean code distribution.

    Probabilities are softmax(-d / temperature) with d the squared L2 distance to the codes. Minimising it makes
    each assignment confident while spreading the batch over the whole codebook. Computed in row slices, forward
    and backward (:class:`_SearchEntropy`), so that memory stays bounded for large batch x codebook.
    """
    return search_with_entropy(z_ND, codes_KD, temperature, chunk)[2]


def rotate_to(z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """Rotation-trick estimator: returns z_q in the forward pass; the gradient reaches z through a fixed
    rotation-and-scale that maps z onto z_q (Fifty et al., 2024), instead of the identity of straight-through."""
    eps = 1e-6
    with torch.no_grad():
        z_norm = z.norm(dim=-1, keepdim=True).clamp_min(eps)
        q_norm = z_q.norm(dim=-1, keepdim=True).clamp_min(eps)
        u = z / z_norm
        q = z_q / q_norm
        r = F.normalize(u + q, dim=-1, eps=eps)
        scale = q_norm / z_norm
    # R z with R = I - 2 r r^T + 2 q u^T, applied without forming R
    rz = z - 2 * (z * r).sum(-1, keepdim=True) * r + 2 * (z * u).sum(-1, keepdim=True) * q
    return scale * rz


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        self.cfg = cfg
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.code_dim)
        self.reset_codebook()
        # Rolling window of recent indices for usage/perplexity (metrics only: not saved, never cast to bf16).
        self.register_buffer(
            "usage_window", torch.full((cfg.usage_window,), -1, dtype=torch.long), persistent=False
        )
        self.register_buffer("usage_pos", torch.zeros((), dtype=torch.long), persistent=False)

    def reset_codebook(self) -> None:
        """GigaTok's init: uniform(+-1/K), stored l2-normalised when the codes are."""
        w = self.codebook.weight
        if w.is_meta:
            return
        with torch.no_grad():
            nn.init.uniform_(w, -1.0 / self.cfg.codebook_size, 1.0 / self.cfg.codebook_size)
            if self.cfg.l2_norm:
                w.copy_(F.normalize(w, dim=-1))

    def codes(self) -> torch.Tensor:
        w = self.codebook.weight.float()
        return F.normalize(w, dim=-1) if self.cfg.l2_norm else w

    def forward(self, z_BLD: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        in_dtype = z_BLD.dtype
        z = z_BLD.float()
        if cfg.l2_norm:
            z = F.normalize(z, dim=-1)
        codes = self.codes()
        flat = z.reshape(-1, cfg.code_dim)
        entropy = None
        if cfg.entropy_weight > 0 and self.training:
            # one pass over the distance slices gives the indices and the entropy loss (same indices as the search)
            idx, _, entropy = search_with_entropy(flat, codes, cfg.entropy_temperature, cfg.search_chunk)
        else:
            idx, _ = nearest_code(flat.detach(), codes.detach(), cfg.search_chunk)
        z_q = codes[idx].view_as(z)

        commit = F.mse_loss(z, z_q.detach())
        codebook = F.mse_loss(z_q, z.detach())
        out_q = rotate_to(z, z_q) if cfg.rotation_trick else z + (z_q - z).detach()
        result = {
            "z_q": out_q.to(in_dtype),
            "indices": idx.view(z.shape[:-1]),
            "loss_commit": cfg.beta * commit,
            "loss_codebook": cfg.codebook_weight * codebook,
        }
        if entropy is not None:
            result["loss_entropy"] = cfg.entropy_weight * entropy
        if self.training:
            self._record_usage(idx.detach())
        return result

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for indices (..., ) -> (..., D), fp32."""
        return self.codes()[indices]

    @torch.no_grad()
    def _record_usage(self, idx: torch.Tensor) -> None:
        """Write the step's indices into the rolling window, on the device: the position stays a tensor, so that
        no step waits for the GPU to read it (the window is read at the logging cadence)."""
        n = self.cfg.usage_window
        idx = idx.reshape(-1)[-n:]
        at = (torch.arange(idx.numel(), device=idx.device) + self.usage_pos) % n
        self.usage_window[at] = idx
        self.usage_pos.add_(idx.numel()).remainder_(n)

    @torch.no_grad()
    def usage_stats(self) -> dict[str, float]:
        """Codebook usage (unique codes in the window / K) and perplexity of the window's code histogram."""
        seen = self.usage_window[self.usage_window >= 0]
        if seen.numel() == 0:
            return {"codebook_usage": 0.0, "codebook_perplexity": 0.0}
        counts = torch.bincount(seen, minlength=self.cfg.codebook_size).double()
        p = counts / counts.sum()
        ent = -(p[p > 0] * p[p > 0].log()).sum().item()
        return {
            "codebook_usage": float((counts > 0).sum().item()) / self.cfg.codebook_size,
            "codebook_perplexity": math.exp(ent),
        }
