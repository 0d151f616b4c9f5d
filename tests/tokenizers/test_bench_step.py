"""`tokscale bench tokenizer`: the trainer's step timed, its FLOPs counted, its time split into parts (issue 15).

The command runs once, on 2d-tiny at 32 px with every network of the GigaTok recipe small (a ViT-S/14 teacher at
28 px, a two-layer PatchGAN); the counting and the attribution are checked on networks whose numbers are known.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import profile
from torch.utils.checkpoint import checkpoint

from tokscale.tokenizers.bench import (
    PARTS,
    build_engine,
    count_flops,
    part_times,
    peak_bf16_tflops,
)
from tokscale.trainer import profiled

SMALL_RECIPE = [
    "loss.semantic.teacher_arch=vit_small_patch14_dinov2",
    "loss.semantic.teacher_dim=384",
    "loss.semantic.teacher_size=28",
    "loss.gan.ndf=16",
    "loss.gan.num_layers=2",
    "train.zero_stage=0",
]


@pytest.fixture(scope="module")
def bench_json():
    cmd = [sys.executable, "-m", "tokscale.cli", "bench", "tokenizer", "2d-tiny", *SMALL_RECIPE]
    cmd += ["--batch", "2", "--resolution", "32", "--warmup", "0", "--steps", "1", "--profile-steps", "1"]
    cmd += ["--with-data", "1", "--data-images", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_thread
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 1, out.stdout[-2000:]  # one JSON object and nothing else on stdout
    return json.loads(lines[0])


def test_bench_runs_the_recipes_step_with_the_gan_on_and_the_auxiliary_terms_off_by_default(bench_json):
    r = bench_json
    assert r["config"] == "tokenizer/gigatok" and r["at_step"] == 20000  # the GAN's start (aux ends at 15000)
    assert r["loss_terms"] == [
        "loss_codebook",
        "loss_commit",
        "loss_gan_d",
        "loss_gan_g",
        "loss_lpips",
        "loss_rec",
        "loss_semantic",
    ]
    assert r["frozen_weights"] == {"lpips": "random", "teacher": "random"}
    assert r["engine"].startswith("DeepSpeed") and r["precision"] == "fp32" and r["resolution"] == 32


def test_bench_reports_flops_throughput_and_no_mfu_on_a_cpu(bench_json):
    r = bench_json
    assert r["flops_per_step"] == 2 * r["flops_per_image"] > 0
    assert r["tflops_per_s"] == pytest.approx(
        r["flops_per_step"] / r["s_per_step"] / 1e12, rel=1e-2, abs=1e-4
    )
    assert r["images_per_s"] == pytest.approx(2 / r["s_per_step"], rel=1e-2)
    assert r["mfu"] is None and "CPU" in r["mfu_note"] and r["peak_rss_mb"] > 0


def test_bench_shares_cover_every_part_of_the_step_and_sum_to_one(bench_json):
    shares = bench_json["shares"]
    assert list(shares) == [*PARTS, "other"]
    assert all(shares[p] > 0 for p in PARTS), shares
    assert sum(shares.values()) == pytest.approx(1.0, abs=2e-3)
    # every transformer (tokenizer encoder and decoder, the DINOv2 teacher) runs torch's fused attention kernel
    attention = bench_json["attention_ops"]
    for part in ("encoder", "decoder", "teacher"):
        assert list(attention[part]) == ["aten::_scaled_dot_product_flash_attention_for_cpu"], attention


def test_bench_puts_the_loaders_images_per_second_next_to_the_steps(bench_json):
    data = bench_json["data"]
    assert data["loader_img_per_s_per_rank"]["1"] > 0
    assert data["step_img_per_s_per_rank"] == pytest.approx(bench_json["images_per_s"], rel=1e-3)
    assert data["workers_that_keep_up"] in (1, None)


class Attend(nn.Module):
    def __init__(self, width: int = 32, heads: int = 2, grad_checkpointing: bool = False):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.heads, self.grad_checkpointing = heads, grad_checkpointing

    def block(self, x):
        B, L, D = x.shape
        q = self.proj(x).reshape(B, L, self.heads, D // self.heads).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q)

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=False) if self.grad_checkpointing else self.block(x)


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_flops_count_linear_and_cpu_attention_forward_and_backward_without_recomputation(grad_checkpointing):
    B, L, D, H = 4, 16, 32, 2
    net = Attend(D, H, grad_checkpointing)
    x = torch.randn(B, L, D, requires_grad=True)
    flops = count_flops(lambda: net(x).sum().backward(), net)
    linear = 3 * 2 * B * L * D * D  # forward, then the input's and the weight's gradients
    # QK^T and PV forward; backward four products plus QK^T again (torch's formula, as flash kernels recompute it)
    attention = 14 * B * H * L * L * (D // H)
    assert flops == linear + attention
    assert net.grad_checkpointing is grad_checkpointing  # restored


def test_a_parts_time_is_its_forward_range_plus_the_backward_nodes_it_created():
    a, b = nn.Linear(256, 256), nn.Linear(256, 256)
    x = torch.randn(64, 256)
    with profile() as prof:
        with profiled("encoder"):
            h = a(x).relu()
        with torch.no_grad(), profiled("teacher"):
            t = b(x)
        with profiled("decoder"):
            loss = (h - t).pow(2).mean()
        loss.backward()
    events = prof.events()
    times, _ = part_times(events, device=False)
    forward = {p: sum(e.cpu_time_total for e in events if e.name == p) for p in PARTS}
    assert times["encoder"] > forward["encoder"] > 0  # addmm's and relu's backward nodes added
    assert times["decoder"] > forward["decoder"] > 0
    assert times["teacher"] == forward["teacher"] > 0  # no gradient: no backward nodes
    assert times["quantizer"] == times["optimizer"] == 0


def test_the_dense_bf16_peak_is_known_for_the_usual_gpus_and_refused_for_others():
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3")[0] == 989.4
    assert peak_bf16_tflops("NVIDIA H100 PCIe")[0] == 756.5
    assert peak_bf16_tflops("NVIDIA H200")[0] == 989.4
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert peak_bf16_tflops("NVIDIA L40S")[0] == 362.05
    assert peak_bf16_tflops("NVIDIA L4")[0] == 121.0
    assert peak_bf16_tflops("NVIDIA A10G") == (
        None,
        "no dense bf16 peak known for 'NVIDIA A10G' (tokscale.tokenizers.bench.PEAK_BF16_TFLOPS)",
    )
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3 MIG 1g.10gb")[0] is None


def _losses(extra: list[str], steps: int = 2) -> tuple[list[dict[str, float]], set[bool]]:
    from tokscale.distributed import init_distributed
    from tokscale.tokenizers.train import load_train_config

    cfg = load_train_config(
        "tokenizer/demo",
        [
            "model.image_size=32",
            "data.batch_size=2",
            "loss.gan.weight=0.1",
            "loss.gan.start_step=1",
            "loss.gan.ndf=16",
            "loss.gan.num_layers=2",
            "eval.every_steps=0",
            *extra,
        ],
    )
    task, engine = build_engine(cfg, init_distributed())
    # whether the CNN encoder's stem, the CNN decoder's last convolution (after every upsample) and the
    # discriminator's first convolution ran NHWC
    layouts = []
    for conv in (engine.module.cnn_encoder.conv_in, engine.module.cnn_decoder.conv_out, task.disc.layers[0]):
        conv.register_forward_hook(
            lambda m, i, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last))
        )
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    losses = [
        {k: float(v) for k, v in task.train_step(engine, (images,), step).items()} for step in range(steps)
    ]
    return losses, set(layouts)


@pytest.fixture
def one_thread():
    # two OpenMP threads on two cores shared with other processes spin against them: 50x slower steps
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_channels_last_changes_no_loss_of_the_step(one_thread):
    (plain, plain_layouts), (nhwc, nhwc_layouts) = _losses([]), _losses(["train.channels_last=true"])
    assert plain_layouts == {False} and nhwc_layouts == {True}
    assert "loss_gan_d" in plain[0] and "loss_gan_g" in plain[1]
    for a, b in zip(plain, nhwc):
        assert a.keys() == b.keys()
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize(
    "largest, start, limit, want",
    [
        (37, 8, 4096, 37),
        (3, 8, 4096, 3),
        (0, 8, 4096, 0),
        (5000, 8, 4096, 4096),
        (8, 8, 8, 8),
        (64, 8, 100, 64),
    ],
)
def test_the_batch_search_finds_the_largest_fitting_batch_in_few_tries(largest, start, limit, want):
    from tokscale.tokenizers.bench import largest_batch

    best, tried = largest_batch(lambda b: b <= largest, start, limit)
    assert best == want
    assert all(ok == (b <= largest) for b, ok in tried.items()) and max(tried) <= limit
    assert want in tried or want == 0
    assert want + 1 in tried or want == limit  # the batch above it was seen to fail
    assert len(tried) <= 2 * limit.bit_length()


def test_find_batch_and_memory_cap_need_a_gpu(capsys):
    from tokscale.cli import main as cli_main

    if torch.cuda.is_available():  # CI and this machine have none; on a GPU the two flags run
        return
    assert cli_main(["bench", "tokenizer", "2d-tiny", "--find-batch"]) != 0
    assert "--find-batch measures GPU memory and needs a CUDA device" in capsys.readouterr().err


def test_depth_to_space_keeps_a_channels_last_input_nhwc_only_when_asked_with_the_same_values():
    from tokscale.tokenizers.cnn import depth_to_space

    x = torch.randn(2, 4 * 6, 5, 7)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    want = depth_to_space(x)
    kept = depth_to_space(nhwc, 2, keep_channels_last=True)
    assert torch.equal(kept, want) and torch.equal(depth_to_space(nhwc), want)
    assert kept.is_contiguous(memory_format=torch.channels_last) and not kept.is_contiguous()
    assert depth_to_space(nhwc).is_contiguous()  # the default path: NCHW whatever the input
    # DCR order: input channel (i * 2 + j) * C + c lands at (i, j) of output channel c's 2 x 2 cell
    assert kept[1, 3, 2 * 4 + 1, 2 * 6 + 0] == x[1, (1 * 2 + 0) * 6 + 3, 4, 6]
