"""`tokscale eval prefixes`: a 1D tokenizer's reconstructions from its first t tokens for each t (DetailFlow's
coarse-to-fine curve). A decoder that returns exactly the degraded targets scores them perfectly and rises with t
against the originals; the command writes its rows, CSV, curve and grid, gives the same rows on two ranks, and
refuses inadmissible lengths before anything runs."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from tokscale.cli import main as cli_main
from tokscale.evaluation.config import EvalConfig
from tokscale.evaluation.image_metrics import psnr_per_image
from tokscale.evaluation.inception import quantize_uint8
from tokscale.tokenizers.detailflow import decoder_size, degrade, resolution
from tokscale.tokenizers.prefix_eval import PrefixEvaluator, prefix_lengths
from tokscale.tokenizers.presets import preset_config

DF = [
    "image_size=64",
    "num_tokens=32",
    "token_mask=block_causal",
    "causal_prefix=8",
    "group_size=8",
    "detailflow.enabled=true",
    "detailflow.global_loss_weight=0",
    "encoder.depth=1",
    "decoder.depth=1",
    "quantizer.codebook_size=256",
]
PLAIN = ["image_size=64", "num_tokens=32", "encoder.depth=1", "decoder.depth=1", "quantizer.codebook_size=256"]


def write_export(out, overrides) -> None:
    """A randomly initialised 1d-tiny tokenizer (64 px, 32 tokens) in the export format."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from tokscale.tokenizers.model import VQTokenizer

    torch.manual_seed(0)
    model = VQTokenizer(preset_config("1d-tiny", overrides), with_projector=False)
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    OmegaConf.save(OmegaConf.create({"model": OmegaConf.to_container(OmegaConf.structured(model.config))}),
                   out / "config.yaml")  # fmt: skip


@pytest.fixture(scope="module")
def df_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("prefix") / "df-tiny"
    write_export(out, DF)
    return out


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    from tokscale.evaluation.inception import write_random_inception_weights

    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "inception.pth", seed=0)


@pytest.fixture(scope="module")
def embedded_batches():
    """The first 12 embedded evaluation images as EvalStream yields them at 64 px, in batches of 4."""
    from tokscale.data.stream import DataConfig, EvalStream

    cfg = DataConfig(eval_shards="embedded", resolution=64, crop="adm_center", hflip=False, batch_size=4,
                     num_workers=0)  # fmt: skip
    return list(EvalStream(cfg, 0, 1, max_samples=12))


class TargetDecoder(nn.Module):
    """A stand-in tokenizer whose codes name the image and whose prefix of t codes decodes to exactly the
    degraded target of t (the image area-downsampled to R(t), bicubic-upsampled to the decoder size): what a
    perfectly trained DetailFlow tokenizer would return."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.anchor = nn.Parameter(torch.zeros(1))
        self.images = None

    def encode(self, images):
        self.images = images.float()
        return torch.arange(images.shape[0])[:, None].expand(-1, self.config.num_tokens)

    def decode(self, codes):
        c, t = self.config, codes.shape[1]
        res = resolution(t, c.num_tokens, c.image_size, c.detailflow.power)
        size = decoder_size(t, c.num_tokens, c.image_size, c.detailflow.power, c.cnn.downsample)
        return degrade(self.images[codes[:, 0]], res, size)


def test_a_decoder_of_exact_targets_scores_them_perfectly_and_rises_with_t_against_the_originals(
    embedded_batches,
):
    cfg = preset_config("1d-tiny", DF)
    lengths = prefix_lengths(cfg)
    assert lengths == [1, 2, 4, 8, 16, 32]
    result = PrefixEvaluator(EvalConfig(compute_fid=False, compute_lpips=False)).run(
        TargetDecoder(cfg), embedded_batches, lengths, progress=False
    )
    assert result.num_samples == 12
    rows = result.rows
    assert [(r["t"], r["resolution"], r["decoder_size"]) for r in rows] == [
        (1, 1, 16), (2, 4, 16), (4, 9, 16), (8, 21, 32), (16, 40, 48), (32, 64, 64),
    ]  # fmt: skip
    assert all(math.isinf(r["target_psnr"]) and r["target_ssim"] == pytest.approx(1.0) for r in rows)
    psnr = [r["psnr"] for r in rows]
    assert psnr[:-1] == sorted(psnr[:-1]) and psnr[0] < psnr[-2] - 3 and math.isinf(psnr[-1])
    # the value against the original: the decoded prefix upsampled (bicubic) to 64 px, both in uint8
    images = torch.cat([b[0] for b in embedded_batches])
    up = degrade(degrade(images, 21, 32), 32, 64)  # degrade(x, 32, 64) of a 32 px image: bicubic up only
    expected = psnr_per_image(quantize_uint8(images).double() / 255.0, quantize_uint8(up).double() / 255.0).mean()
    assert rows[3]["psnr"] == pytest.approx(float(expected), rel=1e-9)
    grid = result.grid
    assert len(grid) == 7 and all(g.shape == (2, 3, 64, 64) and g.dtype == torch.uint8 for g in grid)


def test_a_tokenizer_without_the_schedule_decodes_every_prefix_at_full_size(embedded_batches):
    from tokscale.tokenizers.model import VQTokenizer

    torch.manual_seed(0)
    tok = VQTokenizer(preset_config("1d-tiny", PLAIN), with_projector=False)
    assert prefix_lengths(tok.config, [3, 5, 32]) == [3, 5, 32]  # any prefix 1..N
    result = PrefixEvaluator(EvalConfig(compute_fid=False)).run(tok, embedded_batches[:1], [3, 32], progress=False)
    for row in result.rows:
        assert (row["resolution"], row["decoder_size"]) == (64, 64)
        assert row["target_psnr"] == row["psnr"] and row["target_ssim"] == row["ssim"]
    assert result.rows[0]["psnr"] != result.rows[1]["psnr"]
    # all N tokens: what `eval recon` measures
    from tokscale.tokenizers.recon_eval import ReconEvaluator

    recon = ReconEvaluator(EvalConfig(compute_fid=False, compute_lpips=False)).run(
        tok, embedded_batches[:1], progress=False
    )
    assert result.rows[1]["psnr"] == pytest.approx(recon.metrics["psnr"], rel=1e-9)
    assert result.rows[1]["ssim"] == pytest.approx(recon.metrics["ssim_dr1"], rel=1e-9)


def test_lengths_must_be_admissible_and_the_tokenizer_1d_or_multiscale():
    df = preset_config("1d-tiny", DF)
    assert prefix_lengths(df, [16, 8, 1]) == [1, 8, 16]
    for bad in (12, 33, 0):
        with pytest.raises(ValueError, match=rf"prefix length {bad} .* expected 1\.\.8, then multiples of 8 up to 32"):
            prefix_lengths(df, [8, bad])
    with pytest.raises(ValueError, match=r"prefix length 40 .* expected 1\.\.32"):
        prefix_lengths(preset_config("1d-tiny", PLAIN), [40])
    with pytest.raises(ValueError, match="needs a 1D or multi-scale tokenizer"):
        prefix_lengths(preset_config("2d-tiny", []))
    # a multi-scale tokenizer: every scale boundary by default, nothing between them
    ms = preset_config("2d-tiny", ["image_size=64", "quantizer.kind=multiscale", "quantizer.scales=[1,2,4]"])
    assert prefix_lengths(ms) == [1, 5, 21]
    with pytest.raises(ValueError, match=r"prefix length 4 .* a scale boundary, one of \[1, 5, 21\]"):
        prefix_lengths(ms, [4])


def test_the_command_refuses_an_inadmissible_length_before_anything_runs(df_export, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli_main(["eval", "prefixes", str(df_export), "--data", "embedded", "--lengths", "8,12", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "prefix length 12" in err and "multiples of 8" in err
    assert cli_main(["eval", "prefixes", str(df_export), "--data", "embedded", "--lengths", "8,x"]) == 2
    assert "--lengths '8,x'" in capsys.readouterr().err
    assert cli_main(["eval", "prefixes", str(df_export), "--data", "embedded", "--reference", "ref.npz"]) == 2
    assert "--inception-weights" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out.eval-job").exists()


def _eval(export, out, cache, lengths, *extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run(
        [sys.executable, "-m", "tokscale.cli", "eval", "prefixes", str(export), "--data", "embedded",
         "--lengths", lengths, "--num-samples", "4", "--batch-size", "2", "--out", str(out),
         f"data.cache_dir={cache}", "data.num_workers=0", *extra],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def test_eval_prefixes_writes_rows_csv_curve_and_grid_and_two_ranks_give_the_same_rows(
    df_export, tmp_path, inception_weights
):
    from PIL import Image

    weights = ("--inception-weights", str(inception_weights))
    one = _eval(df_export, tmp_path / "one", tmp_path / "cache", "1,8,16,32", *weights)
    assert one["num_samples"] == 4 and one["world_size"] == 1 and one["num_tokens"] == 32
    assert one["schedule"] == {"power": 1.5, "group_size": 8, "patch": 16}
    rows = one["rows"]
    assert [(r["t"], r["resolution"], r["decoder_size"]) for r in rows] == [
        (1, 1, 16), (8, 21, 32), (16, 40, 48), (32, 64, 64)
    ]
    assert all(r["rfid"] > 0 and 0 < r["psnr"] < 60 and -1 <= r["ssim"] <= 1 for r in rows)
    with open(tmp_path / "one" / "prefixes.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["t"]) for r in table] == [1, 8, 16, 32]
    assert float(table[2]["psnr"]) == pytest.approx(rows[2]["psnr"]) and table[2]["rfid"]
    with Image.open(tmp_path / "one" / "curve.png") as img:
        assert img.size[0] > 1000  # two panels: PSNR and rFID
    with Image.open(tmp_path / "one" / "grid.png") as img:
        assert img.size[0] >= 5 * 128 and img.size[1] >= 2 * 128  # 4 lengths + the original, 2 images
    # two ranks (two images each; the Inception on a CPU is the slow part, so two lengths)
    two = _eval(df_export, tmp_path / "two", tmp_path / "cache", "1,32", *weights, "--nproc", "2")
    assert two["world_size"] == 2 and two["num_samples"] == 4
    assert [r["t"] for r in two["rows"]] == [1, 32]
    for a, b in zip([rows[0], rows[-1]], two["rows"]):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6), key
