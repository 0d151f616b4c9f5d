"""The multi-scale residual quantizer (quantizer.kind=multiscale): the residual bookkeeping, prefix decoding,
VAR's teacher-forcing input and sampling steps, the tokenizer around it, its config checks, a few training steps
with the entropy and semantic losses, and extraction's scale boundaries."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tokscale.tokenizers.model import VQTokenizer
from tokscale.tokenizers.multiscale import MultiScaleQuantizer, phi_index
from tokscale.tokenizers.presets import preset_config
from tokscale.tokenizers.quantizer import QuantizerConfig

# 2d-tiny at 32 px with 8x downsampling: a 4x4 grid quantized at scales 1, 2, 3, 4 (30 codes)
TINY = [
    "image_size=32",
    "cnn.channel_mults=[1,2,2,4]",
    "cnn.num_groups=1",
    "encoder.depth=1",
    "decoder.depth=1",
    "quantizer.codebook_size=256",
    "quantizer.kind=multiscale",
    "quantizer.scales=[1,2,3,4]",
]


def quantizer(**kw) -> MultiScaleQuantizer:
    torch.manual_seed(0)
    args = dict(kind="multiscale", scales=[1, 2, 3, 5], codebook_size=64, code_dim=4)
    args.update(kw)
    q = MultiScaleQuantizer(QuantizerConfig(**args))
    with torch.no_grad():  # phi convolutions far from the identity, so a wrong phi or order shows
        for phi in q.phis:
            phi.conv.weight.normal_(0, 0.2)
    return q


def latents(q: MultiScaleQuantizer, batch: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, q.grid**2, q.cfg.code_dim, generator=g) * 2


def tiny_model(*extra: str) -> VQTokenizer:
    torch.manual_seed(0)
    return VQTokenizer(preset_config("2d-tiny", [*TINY, *extra]), with_projector=False)


# ----------------------------------------------------------------------------------------------------------------
# the quantizer


def test_phi_convolutions_are_chosen_by_the_scale_ratio_as_var_does():
    assert [phi_index(k, 10, 4) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [phi_index(k, 7, 4) for k in range(7)] == [0, 0, 1, 2, 2, 3, 3]
    assert [phi_index(k, 10, 10) for k in range(10)] == list(range(10))  # one per scale
    assert [phi_index(k, 5, 1) for k in range(5)] == [0] * 5  # one shared
    assert [phi_index(k, 3, 2) for k in range(3)] == [0, 0, 1]


def test_the_residual_after_the_last_scale_equals_the_latents_minus_f_hat():
    q = quantizer()
    f = q.to_map(latents(q))
    out = q.quantize_map(f)
    assert torch.allclose(out.residual, f - out.f_hat, atol=1e-6)
    assert out.residual.abs().max() > 1e-2  # a lossy case: the identity is not trivially zero = zero
    assert torch.allclose(q.indices_to_fhat(out.indices), out.f_hat, atol=1e-6)
    # the residual each scale searched is the area-downsampled latents minus the scales before it
    for k, p in enumerate(q.scales[1:], start=1):
        before = q.indices_to_fhat(out.indices[:k])
        rows = F.adaptive_avg_pool2d(f - before, p).permute(0, 2, 3, 1).reshape(-1, 4)
        nearest = torch.cdist(rows, q.codes()).argmin(1)
        assert torch.equal(nearest.view(3, p * p), out.indices[k])


def test_forward_returns_f_hat_and_the_flat_per_scale_codes():
    q = quantizer().eval()
    z = latents(q)
    out = q(z)
    f_hat = q.quantize_map(q.to_map(z)).f_hat
    assert q.num_scale_tokens == 1 + 4 + 9 + 25 and out["indices"].shape == (3, 39)
    assert q.scale_boundaries == [0, 1, 5, 14, 39]
    assert torch.allclose(out["z_q"], f_hat.flatten(2).transpose(1, 2), atol=1e-5)
    parts = q.split(out["indices"])
    assert [p.shape[1] for p in parts] == [1, 4, 9, 25]
    assert all(torch.equal(a, out["indices"][:, s]) for a, s in zip(parts, q.scale_slices()))
    assert len(q.split(out["indices"][:, :14])) == 3  # a prefix of whole scales
    with pytest.raises(ValueError, match=r"\[1, 5, 14, 39\]"):
        q.split(out["indices"][:, :10])
    assert QuantizerConfig(kind="multiscale").scales[-1] == 16
    assert MultiScaleQuantizer(QuantizerConfig(kind="multiscale")).num_scale_tokens == 680
    assert q(z.to(torch.bfloat16))["z_q"].dtype == torch.bfloat16


def test_the_f_hat_error_falls_with_every_scale_on_a_dense_codebook():
    """Identity phi and a dense 2-d lattice of codes (step 0.1, zero included): each scale can only remove what
    the coarser ones left, down to the lattice's resolution at the full grid."""
    q = quantizer(scales=[1, 2, 4, 8, 16], code_dim=2, codebook_size=41 * 41, l2_norm=False, phi_mix=0.0)
    assert len(q.phis) == 0
    axis = torch.linspace(-2, 2, 41)
    with torch.no_grad():
        q.codebook.weight.copy_(torch.cartesian_prod(axis, axis))
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(2, 2, 3, 3, generator=g)
    f = F.interpolate(coarse, size=(16, 16), mode="bicubic") + 0.1 * torch.randn(2, 2, 16, 16, generator=g)
    idx = q.quantize_map(f).indices
    errors = [(f - q.indices_to_fhat(idx[:k])).square().mean().item() for k in range(1, 6)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] <= 0.05**2 * 2 and errors[0] > 10 * errors[-1]


def test_var_input_is_the_f_hat_of_the_scales_before_area_downsampled_to_the_next():
    q = quantizer()
    idx = q.quantize_map(q.to_map(latents(q))).indices
    x = q.var_input(idx)
    assert x.shape == (3, 39 - 1, 4)
    b = q.scale_boundaries
    for k in range(1, len(q.scales)):
        p = q.scales[k]
        expect = F.adaptive_avg_pool2d(q.indices_to_fhat(idx[:k]), p).flatten(2).transpose(1, 2)
        assert torch.allclose(x[:, b[k] - 1 : b[k + 1] - 1], expect, atol=1e-6), k
    assert torch.allclose(q.var_input(idx[:-1]), x)  # the last scale's codes are not needed


def test_next_scale_rebuilds_every_prefix_and_the_teacher_forcing_input_step_by_step():
    q = quantizer()
    idx = q.quantize_map(q.to_map(latents(q))).indices
    teacher = q.var_input(idx)
    f_hat, inputs = None, []
    for k in range(len(q.scales)):
        f_hat, nxt = q.next_scale(f_hat, idx[k], k)
        assert torch.allclose(f_hat, q.indices_to_fhat(idx[: k + 1]), atol=1e-6)
        if k < len(q.scales) - 1:
            assert nxt.shape == (3, q.scales[k + 1] ** 2, 4)
            inputs.append(nxt)
        else:
            assert nxt is None
    assert torch.allclose(torch.cat(inputs, 1), teacher, atol=1e-6)


def test_training_forward_trains_encoder_codebook_and_phis_and_records_usage():
    q = quantizer(entropy_weight=0.1).train()
    z = latents(q).requires_grad_(True)
    out = q(z)
    assert set(out) == {"z_q", "indices", "loss_commit", "loss_codebook", "loss_entropy"}
    (out["z_q"].square().sum() + out["loss_commit"]).backward(retain_graph=True)
    assert z.grad.abs().sum() > 0 and q.codebook.weight.grad is None  # rotation: the decoder trains the encoder
    z.grad = None
    out["loss_codebook"].backward(retain_graph=True)
    assert z.grad is None and q.codebook.weight.grad.abs().sum() > 0
    assert all(phi.conv.weight.grad.abs().sum() > 0 for phi in q.phis)
    out["loss_entropy"].backward()
    assert z.grad.abs().sum() > 0  # through the residual rows of every scale
    assert q.usage_stats()["codebook_usage"] > 0
    assert "loss_entropy" not in q.eval()(z)


# ----------------------------------------------------------------------------------------------------------------
# the tokenizer


def test_decoding_all_scales_equals_the_reconstruction_and_every_prefix_decodes():
    model = tiny_model().eval()
    assert model.num_tokens == 30 and model.config.tokens == 30
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        recon = model(images)["recon"]
    codes = model.encode(images)
    assert codes.shape == (2, 30) and codes.dtype == torch.long
    assert torch.allclose(model.decode(codes), recon, atol=1e-4)
    scales = model.encode_scales(images)
    assert [s.shape[1] for s in scales] == [1, 4, 9, 16]
    prefixes = [model.decode(codes[:, :n]) for n in (1, 5, 14)]
    for k, img in enumerate(prefixes, start=1):
        assert img.shape == (2, 3, 32, 32)
        assert torch.allclose(img, model.decode_scales(scales[:k]), atol=1e-6)
    assert not torch.allclose(prefixes[0], prefixes[1], atol=1e-3)  # another scale changes the image
    with pytest.raises(ValueError, match="prefix of whole scales"):
        model.decode(codes[:, :7])
    with pytest.raises(ValueError, match="multi-scale"):
        VQTokenizer(preset_config("2d-tiny", TINY[:-2]), with_projector=False).encode_scales(images)


@pytest.mark.parametrize(
    "extra, key",
    [
        (["quantizer.scales=[1,3,2,4]"], "quantizer.scales"),
        (["quantizer.scales=[0,4]"], "quantizer.scales"),
        (["quantizer.scales=[1,2,8]"], "model.quantizer.scales"),  # the grid is 4
        (["quantizer.kind=rvq"], "quantizer.kind"),
        (["quantizer.phi_count=0"], "quantizer.phi_count"),
        (["quantizer.phi_mix=1.5"], "quantizer.phi_mix"),
    ],
)
def test_multiscale_config_errors_name_the_key(extra, key):
    with pytest.raises(ValueError, match=key):
        preset_config("2d-tiny", [*TINY, *extra])


def test_multiscale_needs_a_2d_tokenizer():
    with pytest.raises(ValueError, match="2D tokenizer"):
        preset_config("1d-tiny", ["quantizer.kind=multiscale", "num_tokens=16"])


# ----------------------------------------------------------------------------------------------------------------
# training and extraction


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A random-weight timm ViT-Ti/16 at 32 px standing in for the frozen DINOv2 teacher."""
    import timm

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "vit_tiny.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0).state_dict(), path)
    return path


def test_a_few_training_steps_with_entropy_and_semantic_losses(tmp_path, image_shards, tiny_teacher):
    from tokscale.tokenizers.train import load_train_config, main

    run_dir = tmp_path / "run"
    cfg = load_train_config(
        "tokenizer/multiscale-tiny",
        [
            f"run_dir={run_dir}",
            f"data.train_shards={image_shards}",
            f"data.eval_shards={image_shards}",
            *[f"model.{o}" for o in TINY],
            "model.semantic_dim=192",
            "data.batch_size=2",
            "data.num_workers=0",
            "data.shuffle_buffer=8",
            "data.batches_per_epoch=4",
            "loss.semantic.weight=0.5",
            "loss.semantic.decoder_layer=1",
            f"loss.semantic.teacher_weights={tiny_teacher}",
            "loss.semantic.teacher_arch=vit_tiny_patch16_224",
            "loss.semantic.teacher_size=32",
            "loss.semantic.teacher_dim=192",
            "train.max_steps=3",
            "train.log_every=1",
            "train.ckpt_every=3",
            "train.image_every=3",
            "train.progress=false",
            "optim.warmup_steps=1",
            "eval.every_steps=0",
        ],
    )
    assert cfg.model.quantizer.entropy_weight > 0  # the demo recipe's
    assert main(cfg)["status"] == "done"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/loss_total" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("loss_rec", "loss_commit", "loss_codebook", "loss_entropy", "loss_semantic", "grad_norm"):
            assert torch.isfinite(torch.tensor(r[f"train/{key}"])), key
        assert r["train/codebook_usage"] > 0


def test_extraction_stores_the_flat_sequence_and_the_scale_boundaries(tmp_path):
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from tokscale.data.locations import resolve_shards
    from tokscale.data.samples import decode_image, iter_raw_samples
    from tokscale.data.tokens import load_tokens
    from tokscale.data.transforms import to_tensor
    from tokscale.tokenizers.extract import crops

    model = tiny_model()
    export = tmp_path / "ms-tiny"
    export.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(export / "model.safetensors"))
    cfg = OmegaConf.to_container(OmegaConf.structured(model.config))
    OmegaConf.save(OmegaConf.create({"model": cfg}), export / "config.yaml")
    out = tmp_path / "tokens"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    res = subprocess.run(
        [sys.executable, "-m", "tokscale.cli", "extract", str(export), "--data", "embedded", "--split", "eval",
         str(out), "--aug", "center", "--batch-size", "100"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["scales"] == [1, 2, 3, 4] and manifest["scale_boundaries"] == [0, 1, 5, 14, 30]
    assert manifest["num_tokens"] == 30 and manifest["num_samples"] == 200
    data = load_tokens(str(out / "*.tar"))
    tokens = data["tokens"].reshape(200, 30)
    sample = next(iter_raw_samples(resolve_shards("embedded", "eval")[0]))
    x = to_tensor(crops(decode_image(sample), 32, "center")[0].copy())[None]
    model.eval()
    assert torch.equal(tokens[data["keys"].index(sample.key)], model.encode(x)[0])
