"""Equality with the reference GPTs' own code: tests/fixtures/gpt/ (copied from the shared fixtures; see their
README) holds, for a tiny LlamaGen GPT (2D RoPE) and a tiny GigaTok 1D GPT (learned positions), a manifest that
regenerates the reference state dict and the reference model's outputs. Each state dict is regenerated, saved as
the references save it, converted with ``tokscale convert llamagen|gigatok-gpt`` and run in tokscale."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reference_weights import FIXTURES, reference_state_dict
from safetensors.torch import load_file

from tokscale.autoregressive.load import load_gpt
from tokscale.autoregressive.sample import SampleConfig, generate
from tokscale.cli import main

GPT_FIXTURES = FIXTURES / "gpt"
ATOL = 1e-4
SOURCES = {"llamagen_tiny": "llamagen", "gigatok_tiny": "gigatok-gpt"}


def reference_checkpoint(name: str, tmp_path: Path, container: str = "model") -> Path:
    path = tmp_path / f"{name}.pt"
    torch.save({container: reference_state_dict(GPT_FIXTURES / name)}, path)
    return path


def converted(name: str, tmp_path: Path):
    ckpt = reference_checkpoint(name, tmp_path)
    out = tmp_path / f"{name}-export"
    # the tiny fixtures' 4 heads match no preset of width 64: given, as for any non-preset size
    args = ["convert", SOURCES[name], str(ckpt), str(out), "--heads", "4"]
    if name == "llamagen_tiny":
        args += ["--num-tokens", "16"]  # LlamaGen's weights do not record the 4x4 grid
    assert main(args) == 0
    return load_gpt(out), load_file(GPT_FIXTURES / name / "io.safetensors")


@pytest.mark.parametrize("name", list(SOURCES))
def test_converted_reference_gpt_gives_the_reference_teacher_forced_logits(name, tmp_path):
    model, io = converted(name, tmp_path)
    cfg = model.config
    assert (cfg.width, cfg.depth, cfg.heads, cfg.vocab_size, cfg.num_tokens, cfg.num_classes) == (
        64,
        4,
        4,
        512,
        16,
        10,
    )
    assert cfg.position == ("rope2d" if name == "llamagen_tiny" else "learned")
    with torch.no_grad():
        logits = model(io["tokens"], io["labels"])  # the third label is the null class
    torch.testing.assert_close(logits, io["logits"], atol=ATOL, rtol=0)


def test_converted_gigatok_gpt_gives_the_reference_linear_probe_features(tmp_path):
    model, io = converted("gigatok_tiny", tmp_path)
    with torch.no_grad():
        feats = model.features(io["tokens"], io["labels"], layer=model.config.depth // 2)
    torch.testing.assert_close(feats, io["features_half"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_kv_cache_sampler_reproduces_llamagens_greedy_generations(cfg_scale, tmp_path):
    model, io = converted("llamagen_tiny", tmp_path)
    labels = io["labels"][:2]  # the fixture's two generations are of its first two labels
    sample = SampleConfig(cfg_scale=cfg_scale, cfg_schedule="constant", top_k=1)
    codes = generate(model, labels, sample, torch.Generator().manual_seed(0))
    want = io[f"greedy_cfg{int(cfg_scale)}"].long()
    assert torch.equal(codes, want), (codes, want)
    # the no-cache path recomputes every prefix and must agree
    assert torch.equal(generate(model, labels, sample, use_cache=False), want)


def test_convert_reads_ema_and_wrapped_state_dicts(tmp_path):
    state = reference_state_dict(GPT_FIXTURES / "gigatok_tiny")
    wrapped = {f"module._orig_mod.{k}": v for k, v in state.items()}
    torch.save({"model": {}, "ema": wrapped}, tmp_path / "ema.pt")
    out = tmp_path / "ema-export"
    assert (
        main(
            ["convert", "gigatok-gpt", str(tmp_path / "ema.pt"), str(out), "--heads", "4", "--weights", "ema"]
        )
        == 0
    )
    model = load_gpt(out)
    assert torch.equal(model.pos_embed.detach(), state["positional_embedding"])
    assert "GigaTok" in (out / "README.md").read_text() and "ema" in (out / "training.json").read_text()


def test_convert_names_unknown_and_missing_keys_and_refuses_bad_options(tmp_path, capsys):
    state = reference_state_dict(GPT_FIXTURES / "llamagen_tiny")
    state["extra.weight"] = torch.zeros(2)
    del state["layers.1.ffn_norm.weight"]
    torch.save({"model": state}, tmp_path / "bad.pt")
    args = [
        "convert",
        "llamagen",
        str(tmp_path / "bad.pt"),
        str(tmp_path / "o1"),
        "--heads",
        "4",
        "--num-tokens",
        "16",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (
        "unexpected keys ['extra.weight']" in err
        and "missing tokscale keys ['blocks.1.ffn_norm.weight']" in err
    )

    ckpt = reference_checkpoint("llamagen_tiny", tmp_path)
    assert main(["convert", "llamagen", str(ckpt), str(tmp_path / "o2"), "--heads", "4"]) == 2
    assert "--num-tokens" in capsys.readouterr().err
    assert main(["convert", "llamagen", str(ckpt), str(tmp_path / "o3"), "--num-tokens", "16"]) == 2
    assert "pass --heads" in capsys.readouterr().err
    assert (
        main(["convert", "llamagen", str(ckpt), str(tmp_path / "o4"), "--num-tokens", "15", "--heads", "4"])
        == 2
    )
    assert "model.num_tokens=15 is not a square grid" in capsys.readouterr().err
    assert main(["convert", "llamagen", str(ckpt), str(tmp_path / "o5"), "--weights", "ema"]) == 2
    assert "has no 'ema' entry" in capsys.readouterr().err
    # a GigaTok 1D checkpoint given to the LlamaGen converter, and the reverse, say which converter to use
    giga = reference_checkpoint("gigatok_tiny", tmp_path)
    assert (
        main(["convert", "llamagen", str(giga), str(tmp_path / "o6"), "--num-tokens", "16", "--heads", "4"])
        == 2
    )
    assert "use `tokscale convert gigatok-gpt`" in capsys.readouterr().err
    assert main(["convert", "gigatok-gpt", str(ckpt), str(tmp_path / "o7"), "--heads", "4"]) == 2
    assert "use `tokscale convert llamagen`" in capsys.readouterr().err
    # a training checkpoint holding Python objects needs --allow-pickle
    torch.save(
        {"model": reference_state_dict(GPT_FIXTURES / "gigatok_tiny"), "args": Path("x")}, tmp_path / "p.pt"
    )
    assert main(["convert", "gigatok-gpt", str(tmp_path / "p.pt"), str(tmp_path / "o8"), "--heads", "4"]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert (
        main(
            [
                "convert",
                "gigatok-gpt",
                str(tmp_path / "p.pt"),
                str(tmp_path / "o8"),
                "--heads",
                "4",
                "--allow-pickle",
            ]
        )
        == 0
    )
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 8))
