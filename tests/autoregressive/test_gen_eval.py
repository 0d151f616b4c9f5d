"""`tokscale eval gen` end to end in real processes: a tiny GPT export and a tiny tokenizer export sample images
that are scored against ADM-format references.

- against a reference made of the same images, FID is ~0 and precision = recall = 1;
- against a disjoint reference, FID equals tokscale's FID code on statistics computed here from the ADM npz;
- one rank and two ranks give the same samples and the same numbers;
- a run stopped after its first chunks resumes from them and ends with the numbers of an uninterrupted run;
- the results JSON holds every setting, the ADM npz opens with numpy; a CFG search records every point.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "evaluation"))
sys.path.insert(0, str(Path(__file__).parent))
from palette import write_tiny_export  # noqa: E402
from test_sample_cli import write_gpt  # noqa: E402

from tokscale.autoregressive.gen_eval import (  # noqa: E402
    GenEvalConfig,
    next_greedy,
    sample_labels,
)

N, BATCH = 12, 4


def refuse(name):
    raise ValueError(f"results hold {name}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tokscale.evaluation.inception import write_random_inception_weights

    root = tmp_path_factory.mktemp("gen")
    tok = root / "tok"
    write_tiny_export(tok)  # 2d-tiny at 32 px: 4 tokens
    gpt = write_gpt(root / "gpt", num_tokens=4)
    weights = write_random_inception_weights(root / "inception.pth", seed=0)
    # A disjoint reference: 20 random 32 px images (arr_0 only: FID and P/R both come from their activations).
    rng = np.random.default_rng(7)
    disjoint = root / "disjoint.npz"
    np.savez(disjoint, arr_0=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8))
    return {"root": root, "gpt": gpt, "tok": tok, "weights": weights, "disjoint": disjoint}


def eval_gen(setup, out, reference, *extra, check=True):
    cmd = [
        sys.executable, "-m", "tokscale.cli", "eval", "gen", str(setup["gpt"]), "--tokenizer", str(setup["tok"]),
        "--reference", str(reference), "--inception-weights", str(setup["weights"]), "--out", str(out),
        "--num-samples", str(N), "--batch-size", str(BATCH), "--cfg-scale", "1.5", "--seed", "3", "--device",
        "cpu", *map(str, extra),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def one_rank(setup):
    out = setup["root"] / "one"
    eval_gen(setup, out, setup["disjoint"])
    return out


def test_results_hold_every_setting_and_the_samples_are_an_adm_npz(one_rank, setup):
    res = results(one_rank)
    for key in ("fid", "is_mean", "is_std", "precision", "recall", "num_samples", "class_rule", "sampler",
                "cfg_scale", "cfg_schedule", "sampling_precision", "seed", "reference", "feature_extractor",
                "image_size_eval", "gpt", "tokenizer", "world_size"):  # fmt: skip
        assert key in res, key
    assert res["num_samples"] == N and res["class_rule"] == "uniform" and res["cfg_scale"] == 1.5
    assert res["sampler"]["top_k"] == 0 and res["sampler"]["batch_size"] == BATCH
    assert res["sampling_precision"] == "fp32" and res["seed"] == 3
    import hashlib

    assert res["reference"]["sha256"] == hashlib.sha256(setup["disjoint"].read_bytes()).hexdigest()
    assert res["feature_extractor"]["weights_sha256"]
    assert 0 <= res["precision"] <= 1 and 0 <= res["recall"] <= 1
    with np.load(one_rank / "samples.npz") as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (N, 32, 32, 3)
        labels = z["arr_1"]
    assert labels.tolist() == sample_labels(N, 3, "uniform", 3).tolist()
    assert (one_rank / "grid.png").is_file() and (one_rank / "gen_config.yaml").is_file()
    assert not Path(str(one_rank) + ".gen-job").exists()


def test_fid_against_a_disjoint_set_equals_the_fid_code_on_the_npz_images(one_rank, setup):
    from tokscale.evaluation.fid import GaussianStats, frechet_distance
    from tokscale.evaluation.inception import load_inception

    inception = load_inception(setup["weights"])

    def stats(u8_nhwc):
        s = GaussianStats()
        s.update(inception(torch.from_numpy(u8_nhwc).permute(0, 3, 1, 2).contiguous())[0])
        return s.mean_cov()

    with np.load(one_rank / "samples.npz") as z, np.load(setup["disjoint"]) as r:
        want = frechet_distance(*stats(z["arr_0"]), *stats(r["arr_0"]))
    assert results(one_rank)["fid"] == pytest.approx(want, rel=1e-6)
    assert want > 1.0  # disjoint random images are far from the samples


def test_against_its_own_images_fid_is_zero_and_precision_recall_are_one(one_rank, setup, tmp_path):
    own = tmp_path / "own.npz"
    with np.load(one_rank / "samples.npz") as z:
        np.savez(own, arr_0=z["arr_0"])
    eval_gen(setup, tmp_path / "again", own)
    res = results(tmp_path / "again")
    assert abs(res["fid"]) < 1e-6
    assert res["precision"] == 1.0 and res["recall"] == 1.0


def test_two_ranks_give_the_same_samples_and_numbers(one_rank, setup, tmp_path):
    out = tmp_path / "two"
    eval_gen(setup, out, setup["disjoint"], "--nproc", "2")
    a, b = results(one_rank), results(out)
    assert b["world_size"] == 2
    for key in ("fid", "is_mean", "is_std", "precision", "recall"):
        assert a[key] == b[key], key
    with np.load(one_rank / "samples.npz") as x, np.load(out / "samples.npz") as y:
        assert np.array_equal(x["arr_0"], y["arr_0"])


def test_a_stopped_run_resumes_from_its_chunks(one_rank, setup, tmp_path):
    out = tmp_path / "resumed"
    # First run: the config is prepared by the CLI's own code, then main stops after its first chunk.
    script = textwrap.dedent(f"""
        from tokscale.autoregressive.gen_eval import GenEvalConfig, load_config, main, prepare
        from tokscale.config import load_config as load
        cfg = load(GenEvalConfig, None, [
            "gpt={setup["gpt"]}", "tokenizer={setup["tok"]}", "reference={setup["disjoint"]}",
            "inception_weights={setup["weights"]}", "out={out}", "num_samples={N}", "batch_size={BATCH}",
            "seed=3", "device=cpu", "sample.cfg_scale=1.5",
        ])
        calls = []
        print(main(load_config(prepare(cfg)), should_stop=lambda: calls.append(1) or len(calls) >= 1))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "'stopped'" in r.stdout
    chunks = sorted((Path(str(out) + ".gen-job") / "points").glob("*/chunks/c*.npz"))
    assert [c.name for c in chunks] == ["c000000.npz"] and not out.exists()
    resumed = eval_gen(setup, out, setup["disjoint"])
    assert "1 of 3 chunks finished before" in resumed.stderr
    assert results(out)["fid"] == results(one_rank)["fid"]
    with np.load(one_rank / "samples.npz") as x, np.load(out / "samples.npz") as y:
        assert np.array_equal(x["arr_0"], y["arr_0"])


def test_a_cfg_grid_search_scores_every_point_and_runs_the_full_count_at_the_best(setup, tmp_path):
    out = tmp_path / "search"
    eval_gen(setup, out, setup["disjoint"], "--cfg-search", "grid:1.0,3.0", "--search-samples", "8")
    res = results(out)
    search = res["cfg_search"]
    assert search["mode"] == "grid" and [p["cfg_scale"] for p in search["points"]] == [1.0, 3.0]
    assert all(p["num_samples"] == 8 and "fid" in p for p in search["points"])
    best = min(search["points"], key=lambda p: p["fid"])["cfg_scale"]
    assert search["best_scale"] == best == res["cfg_scale"] and res["num_samples"] == N


def test_greedy_search_walks_to_a_local_minimum():
    fid = {1.0: 5.0, 1.25: 4.0, 1.5: 3.0, 1.75: 3.5, 2.0: 9.0}
    tried: dict[float, float] = {}
    scale = 1.25
    order = []
    while scale is not None:
        tried[scale] = fid[scale]
        order.append(scale)
        scale = next_greedy(tried, 0.25)
    assert order == [1.25, 1.5, 1.75]  # 1.0 is never tried: 1.5's lower neighbour 1.25 was
    assert min(tried, key=tried.get) == 1.5 and 1.0 not in tried


def test_the_class_rules():
    balanced = sample_labels(30, 3, "balanced", 0)
    assert np.bincount(balanced).tolist() == [10, 10, 10] and balanced.tolist() != sorted(balanced.tolist())
    uniform = sample_labels(30, 3, "uniform", 0)
    assert uniform.tolist() == sample_labels(30, 3, "uniform", 0).tolist() and set(uniform) <= {0, 1, 2}
    with pytest.raises(ValueError, match="multiple of num_classes=3"):
        sample_labels(31, 3, "balanced", 0)


def test_bad_settings_fail_before_anything_runs(setup, tmp_path):
    r = eval_gen(setup, tmp_path / "x", tmp_path / "missing.npz", check=False)
    assert r.returncode != 0 and "missing.npz" in r.stderr and "not found" in r.stderr
    r = eval_gen(setup, tmp_path / "x", setup["disjoint"], "--cfg-search", "grid:0.5", check=False)
    assert r.returncode != 0 and "cfg_search" in r.stderr
    r = eval_gen(
        setup,
        tmp_path / "x",
        setup["disjoint"],
        "--class-rule",
        "balanced",
        "--num-samples",
        "13",
        check=False,
    )
    assert r.returncode != 0 and "multiple of num_classes=3" in r.stderr
    assert not (tmp_path / "x.gen-job").exists() or not any((tmp_path / "x.gen-job").iterdir())
    with pytest.raises(ValueError, match="class_rule"):
        GenEvalConfig(gpt="g", tokenizer="t", reference="r", out="o", inception_weights="w", class_rule="x")
