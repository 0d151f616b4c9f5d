"""Equality with GigaTok's own model code: tests/fixtures/gigatok/ (copied from the shared fixtures; see their
README) holds, per tiny model, GigaTok's config, a manifest that regenerates GigaTok's exact state dict, and the
inputs and outputs of GigaTok's model. Each state dict is regenerated, converted with ``tokscale convert
gigatok`` and run in tokscale: every float output within 1e-4, indices equal."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference_weights import regenerate
from safetensors.torch import load_file

from tokscale.cli import main
from tokscale.tokenizers.load import load_tokenizer

FIXTURES = Path(__file__).parent.parent / "fixtures" / "gigatok"
ATOL = 1e-4


def gigatok_checkpoint(name: str, tmp_path: Path) -> Path:
    state = regenerate(json.loads((FIXTURES / name / "state_dict_manifest.json").read_text()))
    path = tmp_path / f"{name}.pt"
    torch.save({"model": state}, path)
    return path


def converted(name: str, tmp_path: Path):
    ckpt = gigatok_checkpoint(name, tmp_path)
    out = tmp_path / f"{name}-export"
    cfg = str(FIXTURES / name / "gigatok_config.yaml")
    assert main(["convert", "gigatok", str(ckpt), str(out), "--config", cfg, "--cnn-channels", "32"]) == 0
    return load_tokenizer(out), load_file(FIXTURES / name / "io.safetensors")


@pytest.mark.parametrize("name", ["1d_tiny", "2d_tiny", "2d_tiny_plain_layers"])
def test_converted_gigatok_model_reproduces_gigatoks_outputs(name, tmp_path):
    model, io = converted(name, tmp_path)
    x = io["images"]
    with torch.no_grad():
        latents = model.encode_latents(x)  # (B, N, 8)
        q = model.quantizer(latents)
        if model.config.kind == "1d":
            # GigaTok returns 1D latents after quant_conv as (B, 8, 1, N)
            torch.testing.assert_close(latents.transpose(1, 2)[:, :, None], io["latents"], atol=ATOL, rtol=0)
        else:
            # for the 2D fixtures GigaTok's encode returned the quantized (unit) codes, (B, 8, G, G)
            g = model.config.grid_size
            z_q = q["z_q"].transpose(1, 2).reshape(x.shape[0], -1, g, g)
            torch.testing.assert_close(z_q, io["latents"], atol=ATOL, rtol=0)
        assert torch.equal(q["indices"], io["indices"].long())
        recon, feats = model.decode_latents(q["z_q"], capture_layer=3)
        torch.testing.assert_close(recon, io["recon"], atol=ATOL, rtol=0)
        torch.testing.assert_close(model.semantic_projector(feats), io["semantic"], atol=ATOL, rtol=0)
        torch.testing.assert_close(
            model.decode(io["spread_codes"].long()), io["spread_codes_recon"], atol=ATOL, rtol=0
        )


def _gigatok_1d_decoder_reference(state: dict, prefix: str, tokens_LBC: torch.Tensor, grid: int, heads: int):
    """GigaTok's 1D transformer decoder written out sequence-first with torch's own MultiheadAttention and
    GigaTok's parameter names: a second implementation to hold tokscale's SDPA path against on a prefix."""
    from torch import nn

    s = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
    width = s["decoder_embed.weight"].shape[0]
    ln = lambda x, name: nn.functional.layer_norm(x, x.shape[-1:], s[f"{name}.weight"], s[f"{name}.bias"])  # noqa: E731
    x = nn.functional.linear(ln(tokens_LBC, "ln_pre"), s["decoder_embed.weight"], s["decoder_embed.bias"])
    n, b, _ = x.shape
    q = x[:1].repeat(grid * grid, 1, 1)
    qpos = s["positional_embedding"]  # (G*G, 1, w)
    kpos = s["latent_token_positional_embedding"][:n]
    depth = len({k.split(".")[1] for k in s if k.startswith("transformer.")})
    for i in range(depth):
        p = f"transformer.{i}."
        attn = {}
        for kind in ("self_attn", "multihead_attn"):
            m = nn.MultiheadAttention(width, heads)
            m.load_state_dict(
                {k[len(p + kind) + 1 :]: v for k, v in s.items() if k.startswith(p + kind + ".")}
            )
            attn[kind] = m.eval()
        h = ln(q, p + "norm1")
        q = q + attn["self_attn"](h + qpos, h + qpos, h)[0]
        h = ln(q, p + "norm2")
        q = q + attn["multihead_attn"](h + qpos, x + kpos, x)[0]
        h = ln(q, p + "norm3")
        h = nn.functional.linear(h, s[p + "linear1.weight"], s[p + "linear1.bias"])
        q = q + nn.functional.linear(nn.functional.gelu(h), s[p + "linear2.weight"], s[p + "linear2.bias"])
    q = ln(q, "ln_post").permute(1, 2, 0).reshape(b, width, grid, grid)
    return nn.functional.conv2d(q, s["conv_out.weight"], s["conv_out.bias"], padding=1)


def test_prefix_decoding_is_gigatoks_decoder_on_the_first_t_tokens(tmp_path):
    model, io = converted("1d_tiny", tmp_path)
    state = regenerate(json.loads((FIXTURES / "1d_tiny" / "state_dict_manifest.json").read_text()))
    with torch.no_grad():
        z_q = model.quantizer(model.encode_latents(io["images"]))["z_q"]
        for t in (1, 8, 16, 32):
            mine, _ = model.decode_map(z_q[:, :t])
            tokens = model.from_code(z_q[:, :t]).transpose(0, 1)  # GigaTok's post_quant_conv, sequence-first
            ref = _gigatok_1d_decoder_reference(state, "s1to2decoder", tokens, model.config.grid_size, 4)
            torch.testing.assert_close(mine, ref, atol=ATOL, rtol=0)
            image = model.decode_latents(z_q[:, :t])[0]
            assert image.shape == io["images"].shape
            if t < 32:
                # a real prefix decode differs from the full reconstruction ...
                assert (image - io["recon"]).abs().max() > 1e-2
        # ... while the fixture's decoded_prefix_t equal the full reconstruction exactly: they were made by slicing
        # the singleton axis of GigaTok's (B, 8, 1, N) latents, which keeps every token
        for t in (1, 8, 16):
            assert torch.equal(io[f"decoded_prefix_{t}"], io["recon"])


def test_convert_refuses_unimplemented_options_and_foreign_keys(tmp_path, capsys):
    from omegaconf import OmegaConf

    ckpt = gigatok_checkpoint("2d_tiny", tmp_path)
    raw = OmegaConf.load(FIXTURES / "2d_tiny" / "gigatok_config.yaml")
    raw.model.init_args.use_qk_norm = True
    bad_cfg = tmp_path / "qk.yaml"
    OmegaConf.save(raw, bad_cfg)
    assert main(["convert", "gigatok", str(ckpt), str(tmp_path / "o1"), "--config", str(bad_cfg)]) != 0
    assert "model.init_args.use_qk_norm=True is not implemented" in capsys.readouterr().err
    state = torch.load(ckpt)["model"]
    state["extra.weight"] = torch.zeros(2)
    del state["s2dencoder.ln_post.bias"]
    torch.save({"model": state}, tmp_path / "bad.pt")
    cfg = str(FIXTURES / "2d_tiny" / "gigatok_config.yaml")
    assert main(["convert", "gigatok", str(tmp_path / "bad.pt"), str(tmp_path / "o2"), "--config", cfg]) != 0
    err = capsys.readouterr().err
    assert (
        "unexpected keys ['extra.weight']" in err and "missing tokscale keys ['encoder.ln_post.bias']" in err
    )
    assert (
        main(["convert", "gigatok", str(ckpt), str(tmp_path / "o3"), "--config", cfg, "--weights", "ema"])
        != 0
    )
    assert "has no 'ema' entry" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_converted_checkpoint_evaluates_with_eval_recon_and_initialises_training(tmp_path, image_shards):
    import yaml

    from tokscale.tokenizers.train import TokenizerTask, load_train_config

    ckpt = gigatok_checkpoint("2d_tiny", tmp_path)
    export = tmp_path / "export"
    cfg_file = str(FIXTURES / "2d_tiny" / "gigatok_config.yaml")
    assert (
        main(["convert", "gigatok", str(ckpt), str(export), "--config", cfg_file, "--cnn-channels", "32"])
        == 0
    )
    reference = load_tokenizer(export)

    out = tmp_path / "eval"
    # a separate process, as a user runs it (eval sets up and tears down its own process group)
    args = [
        "eval",
        "recon",
        str(export),
        "data.num_workers=0",
        "--data",
        image_shards,
        "--no-fid",
        "--no-lpips",
    ]
    args += ["--num-samples", "4", "--batch-size", "2", "--out", str(out)]
    r = subprocess.run(
        [sys.executable, "-m", "tokscale.cli", *args], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    assert m["num_samples"] == 4 and m["codebook_size"] == 512 and math.isfinite(m["psnr"])

    # init_from: a training config with the export's model starts from GigaTok's weights
    model_cfg = yaml.safe_load((export / "config.yaml").read_text())["model"]
    recipe = tmp_path / "finetune.yaml"
    recipe.write_text(yaml.safe_dump({"extends": "tokenizer/demo", "model": model_cfg}))
    cfg = load_train_config(
        recipe,
        [
            f"init_from={export}",
            f"data.train_shards={image_shards}",
            f"model.image_size={model_cfg['image_size']}",
        ],
    )
    model = TokenizerTask(cfg, None).build_model()  # the demo has no semantic loss: no projector is built
    want = {k: v for k, v in reference.state_dict().items() if not k.startswith("semantic_projector.")}
    got = model.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key
