"""`tokscale sample` and `tokscale eval gen` on a VAR, in real processes: a tiny VAR export and a tiny random
multi-scale tokenizer export (conf/tokenizer/multiscale-tiny.yaml) give PNGs of the tokenizer's size, the KV cache
gives the codes of ``--no-cache``, the VAR settings (converted guidance, KV budget, CoDe) are recorded, and
``eval gen`` scores balanced samples against a reference with random Inception weights. Pairs that do not fit and
flags with no VAR meaning are refused, naming both."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from test_sample_cli import write_gpt  # noqa: E402
from test_var_train import write_tokenizer  # noqa: E402

from tokscale.autoregressive.sample import SampleConfig  # noqa: E402
from tokscale.autoregressive.sample_job import check_pair  # noqa: E402
from tokscale.autoregressive.var import VAR, VARConfig  # noqa: E402
from tokscale.autoregressive.var_sample import VAROptions, var_sample_config  # noqa: E402

SCALES, L, CLASSES = [1, 2, 3, 4, 5, 6, 8], 155, 3


def write_var(out: Path, seed: int, **model) -> Path:
    from tokscale.export import write_export

    torch.manual_seed(seed)
    cfg = VARConfig(
        **{"width": 64, "depth": 2, "heads": 2, "vocab_size": 1024, "code_dim": 8, "scales": SCALES,
           "num_classes": CLASSES, "init_adaln_gamma": 0.5, "init_head": 1.0, **model}
    )  # fmt: skip
    var = VAR(cfg)
    out.mkdir(parents=True)
    write_export(out, var.state_dict(), {"model": asdict(cfg)}, "var", {"step": 0}, {}, "# test VAR\n")
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tokscale.evaluation.inception import write_random_inception_weights

    root = tmp_path_factory.mktemp("var-sample")
    rng = np.random.default_rng(5)
    reference = root / "ref.npz"
    np.savez(reference, arr_0=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8))
    return {
        "root": root,
        "tok": Path(write_tokenizer(root / "tok")),
        "var": write_var(root / "var", seed=0),
        "small": write_var(root / "small", seed=1, width=32, depth=1, heads=1),
        "weights": write_random_inception_weights(root / "inception.pth", seed=0),
        "reference": reference,
    }


def tokscale(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tokscale.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def sample(setup, out, *extra):
    r = tokscale(
        "sample", setup["var"], out, "--tokenizer", setup["tok"], "--classes", "0,1,2", "--num", 2,
        "--batch-size", 4, "--seed", 1, "--device", "cpu", "--cfg-scale", 2.5, "--cfg-schedule", "linear",
        "--top-k", 100, *extra,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "samples.json").read_text())


def test_a_var_samples_pngs_through_tokscale_sample_and_the_cache_gives_the_no_cache_codes(setup):
    root = setup["root"]
    cached = sample(setup, root / "cached")
    images = sorted((root / "cached" / "images").glob("*.png"))
    assert [p.name for p in images] == [f"{i:06d}_class{c}.png" for i, c in enumerate([0, 0, 1, 1, 2, 2])]
    assert all(Image.open(p).size == (64, 64) for p in images)  # the tokenizer's 64 px
    codes = np.array(cached["codes"])
    assert codes.shape == (6, L) and 0 <= codes.min() and codes.max() < 1024
    assert len({tuple(c) for c in codes}) == 6  # every sample drawn, not copied
    # the flags reach the VAR sampler, converted explicitly: LlamaGen's 2.5 is VAR's t = 1.5
    assert cached["cfg_scale"] == 2.5 and cached["cfg_schedule"] == "linear"
    vs = cached["var_sampler"]
    assert (vs["cfg_scale"], vs["cfg_schedule"], vs["top_k"], vs["kv_budget"]) == (1.5, "linear", 100, 1.0)
    assert cached["kv_cache"] is True
    uncached = sample(setup, root / "uncached", "--no-cache")
    assert uncached["kv_cache"] is False
    assert uncached["codes"] == cached["codes"]


def test_the_kv_budget_and_code_reach_the_var_sampler_through_the_jobs_model(setup):
    from tokscale.autoregressive.sample import generate
    from tokscale.autoregressive.sample_job import load_model
    from tokscale.tokenizers.load import load_tokenizer

    tok = load_tokenizer(setup["tok"])
    opts = VAROptions(kv_budget=0.3, kv_keep_scales=2, code_handoff=5, small_model=str(setup["small"]))
    plain, both = (
        load_model(str(setup["var"]), tok, VAROptions(), "cpu"),
        load_model(str(setup["var"]), tok, opts, "cpu"),
    )
    labels, scfg = torch.tensor([0, 1, 2, 0]), SampleConfig(cfg_scale=2.5, cfg_schedule="linear", top_k=100)
    a = generate(plain, labels, scfg, torch.Generator().manual_seed(4))
    b = generate(both, labels, scfg, torch.Generator().manual_seed(4))
    # scales 0-2 (14 codes) are drawn before any eviction and by the large model: the same draws as without the
    # options; from scale 3 on the evicted cache and then the small model change them
    assert (a[:, :14] == b[:, :14]).all() and (a[:, 14:] != b[:, 14:]).float().mean() > 0.5
    assert both.stats["forward_passes"] == 5 and both.stats["forward_passes_small"] == 2
    assert 0 < both.stats["peak_kv_bytes"] < plain.stats["peak_kv_bytes"]


def test_eval_gen_scores_balanced_var_samples_and_records_the_var_settings(setup):
    out = setup["root"] / "gen"
    r = tokscale(
        "eval", "gen", setup["var"], "--tokenizer", setup["tok"], "--reference", setup["reference"],
        "--inception-weights", setup["weights"], "--out", out, "--num-samples", 12, "--class-rule", "balanced",
        "--batch-size", 6, "--device", "cpu", "--cfg-scale", 2.0, "--cfg-schedule", "constant",
        "--kv-budget", 0.5, "--code-handoff", 5, "--small-model", setup["small"],
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["num_samples"] == 12 and res["classes_covered"] == CLASSES
    assert np.isfinite(res["fid"]) and res["fid"] > 0 and res["is_mean"] > 0
    assert res["image_size_decoded"] == 64 and res["image_size_eval"] == 32
    assert res["sampler"]["var"] == {
        "kv_budget": 0.5, "kv_keep_scales": 4, "code_handoff": 5, "small_model": str(setup["small"]),
    }  # fmt: skip
    assert (res["sampler"]["var_sampler"]["kv_budget"], res["sampler"]["var_sampler"]["code_handoff"]) == (
        0.5,
        5,
    )
    assert res["sampler"]["var_sampler"]["cfg_scale"] == 1.0  # t = 2.0 - 1
    stats = res["sampler_stats_rank0"]
    assert (stats["batches"], stats["forward_passes"], stats["forward_passes_small"]) == (2, 2 * 5, 2 * 2)
    assert stats["peak_kv_bytes"] > 0
    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].shape == (12, 32, 32, 3)
        assert sorted(np.bincount(z["arr_1"]).tolist()) == [4, 4, 4]


def test_pairs_and_settings_with_no_var_meaning_are_refused_naming_both(setup, tmp_path):
    root = setup["root"]
    other = Path(write_tokenizer(tmp_path / "tok5", ["model.quantizer.scales=[1,2,4,8]"]))
    with pytest.raises(ValueError, match=r"scales \[1, 2, 4, 8\].*scales \[1, 2, 3, 4, 5, 6, 8\]"):
        check_pair(str(setup["var"]), str(other))
    big = Path(write_tokenizer(tmp_path / "tok4096", ["model.quantizer.codebook_size=4096"]))
    with pytest.raises(ValueError, match="codebook_size 4096.*vocab_size 1024"):
        check_pair(str(setup["var"]), str(big))
    narrow = write_var(tmp_path / "narrow", seed=2, code_dim=4)
    with pytest.raises(ValueError, match="small VAR .*code_dim 4"):
        check_pair(str(setup["var"]), str(setup["tok"]), VAROptions(code_handoff=3, small_model=str(narrow)))
    with pytest.raises(ValueError, match="code_handoff must be in 1..6"):
        check_pair(str(setup["var"]), str(setup["tok"]), VAROptions(code_handoff=7, small_model=str(narrow)))
    with pytest.raises(ValueError, match="CoDe needs both"):
        VAROptions(code_handoff=3)
    with pytest.raises(ValueError, match="step schedule has no VAR counterpart"):
        var_sample_config(SampleConfig(cfg_scale=2.0, cfg_schedule="step"))
    with pytest.raises(ValueError, match="cfg_interval=3"):
        var_sample_config(replace(SampleConfig(), cfg_interval=3))
    assert var_sample_config(SampleConfig(cfg_scale=1.0)).guided is False  # 1 = unguided in both
    # a job with the step schedule fails before anything is written, naming the key
    from tokscale.autoregressive.sample_job import SampleJobConfig, prepare

    job = SampleJobConfig(
        gpt=str(setup["var"]), tokenizer=str(setup["tok"]), out=str(root / "step"),
        sample=SampleConfig(cfg_scale=2.0, cfg_schedule="step"),
    )  # fmt: skip
    with pytest.raises(ValueError, match="cfg_schedule='step'"):
        prepare(job)
    assert not (root / "step").exists() and not job.job_dir.exists()
    # and the VAR options are refused for a model that is not a VAR
    gpt = write_gpt(tmp_path / "gpt", num_tokens=4)
    with pytest.raises(ValueError, match="is not a VAR"):
        check_pair(str(gpt), str(setup["tok"]), VAROptions(kv_budget=0.5))
