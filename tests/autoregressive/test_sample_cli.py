"""`tokscale sample` end to end in a real process: a tiny GPT export and a tiny tokenizer export give PNGs, a
grid and the codes; the KV cache and the no-cache path give the same codes; a GPT and a tokenizer that do not
match are refused naming both; an existing folder is not overwritten."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "evaluation"))
from palette import write_tiny_export  # noqa: E402

from tokscale.autoregressive.gpt import GPT, GPTConfig  # noqa: E402
from tokscale.export import write_export  # noqa: E402


def write_gpt(out: Path, num_tokens: int, data: dict | None = None) -> Path:
    torch.manual_seed(0)
    cfg = GPTConfig(width=64, depth=2, heads=4, vocab_size=4096, num_tokens=num_tokens, num_classes=3)
    model = GPT(cfg)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a zero head would sample uniformly
    out.mkdir(parents=True)
    config = {"model": asdict(cfg), **({"data": data} if data else {})}
    write_export(out, model.state_dict(), config, "gpt", {"step": 0}, {}, "# test GPT\n")
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    tok = root / "tok"
    write_tiny_export(tok)  # 2d-tiny at 32 px: 2 x 2 = 4 tokens
    return write_gpt(root / "gpt", num_tokens=4), tok


def error_line(res: subprocess.CompletedProcess) -> str:
    return next(line for line in res.stderr.splitlines() if line.startswith("tokscale: error:"))


def tokscale(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tokscale.cli", "sample", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_samples_are_written_and_the_kv_cache_gives_the_same_codes(pair, tmp_path):
    gpt, tok = pair
    common = [
        "--tokenizer",
        tok,
        "--classes",
        "0,2",
        "--num",
        "3",
        "--cfg-scale",
        "2",
        "--seed",
        "5",
        "--batch-size",
        "4",
    ]
    a = tokscale(gpt, tmp_path / "a", *common)
    assert a.returncode == 0, a.stderr[-2000:]
    b = tokscale(gpt, tmp_path / "b", *common, "--no-cache")
    assert b.returncode == 0, b.stderr[-2000:]
    ra = json.loads((tmp_path / "a" / "samples.json").read_text())
    rb = json.loads((tmp_path / "b" / "samples.json").read_text())
    assert (
        ra["labels"] == [0, 0, 0, 2, 2, 2] and ra["cfg_scale"] == 2 and ra["kv_cache"] and not rb["kv_cache"]
    )
    assert ra["codes"] == rb["codes"] and len({tuple(c) for c in ra["codes"]}) > 1
    assert len(list((tmp_path / "a" / "images").glob("*_class2.png"))) == 3
    assert (tmp_path / "a" / "grid.png").is_file() and not list(tmp_path.glob("*.sample-job"))
    again = tokscale(gpt, tmp_path / "a", *common)
    assert again.returncode != 0 and "exists" in error_line(again)


def test_a_gpt_and_a_tokenizer_that_do_not_match_are_refused_naming_both(pair, tmp_path):
    gpt, tok = pair
    other = write_gpt(tmp_path / "gpt16", num_tokens=16)
    r = tokscale(other, tmp_path / "o", "--tokenizer", tok)
    assert r.returncode != 0
    line = error_line(r)
    assert "makes 4 tokens" in line and "generates 16" in line and str(tok) in line
    shards = tmp_path / "tokens"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"tokenizer_config_sha256": "0" * 64}))
    trained = write_gpt(tmp_path / "gpt-trained", num_tokens=4, data={"train_tokens": str(shards)})
    r = tokscale(trained, tmp_path / "h", "--tokenizer", tok)
    assert r.returncode != 0 and "config sha256 000000000000" in error_line(r)
    assert not (tmp_path / "o").exists() and not (tmp_path / "h").exists()


def test_bench_sample_prints_cached_and_uncached_throughput_as_one_json_object():
    res = subprocess.run(
        [sys.executable, "-m", "tokscale.cli", "bench", "sample", "gpt-tiny", "--batch", "2", "--num-tokens", "16"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["benchmark"] == "ar_sample" and out["num_tokens"] == 16 and out["cfg_scale"] == 2.0
    assert out["tokens_per_s_kv_cache"] > 0 and out["tokens_per_s_no_cache"] > 0
    assert out["speedup"] == pytest.approx(out["tokens_per_s_kv_cache"] / out["tokens_per_s_no_cache"])


COMMON = ["--classes", "0,1,2", "--num", "3", "--cfg-scale", "2", "--seed", "7", "--batch-size", "2"]


def codes_of(folder: Path) -> list:
    return json.loads((folder / "samples.json").read_text())["codes"]


def test_two_ranks_sample_the_same_images_as_one_each_once(pair, tmp_path):
    gpt, tok = pair
    one = tokscale(gpt, tmp_path / "one", "--tokenizer", tok, *COMMON)
    assert one.returncode == 0, one.stderr[-2000:]
    two = tokscale(gpt, tmp_path / "two", "--tokenizer", tok, *COMMON, "--nproc", "2")
    assert two.returncode == 0, two.stderr[-2000:]
    assert codes_of(tmp_path / "two") == codes_of(tmp_path / "one")
    names = sorted(p.name for p in (tmp_path / "two" / "images").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "one" / "images").iterdir()) and len(names) == 9
    assert not list(tmp_path.glob("*.sample-job"))


RESUME = """
import sys
from tokscale.autoregressive.sample_job import load_config, main
calls = []
def stop():
    calls.append(1)
    return len(calls) >= 2  # a preemption once two batches are done
print(main(load_config(sys.argv[1]), should_stop=stop))
"""


def test_a_stopped_or_crashed_sampling_resumes_with_the_same_images(pair, tmp_path):
    gpt, tok = pair
    whole = tokscale(gpt, tmp_path / "whole", "--tokenizer", tok, *COMMON)
    assert whole.returncode == 0, whole.stderr[-2000:]
    from tokscale.autoregressive.sample_job import SampleJobConfig, prepare
    from tokscale.config import load_config

    cfg = load_config(
        SampleJobConfig,
        None,
        [f"gpt={gpt}", f"tokenizer={tok}", f"out={tmp_path / 'resumed'}", "classes=0,1,2", "num=3",
         "seed=7", "batch_size=2", "sample.cfg_scale=2", "progress=false"],
    )  # fmt: skip
    path = prepare(cfg)
    stopped = subprocess.run(
        [sys.executable, "-c", RESUME, str(path)], capture_output=True, text=True, timeout=300
    )
    assert "'status': 'stopped'" in stopped.stdout, stopped.stderr[-2000:]
    work = tmp_path / "resumed.sample-job"
    assert sorted(p.name for p in (work / "chunks").glob("*.json")) == ["c000000.json", "c000001.json"]
    (work / "chunks" / "c000001.json").unlink()  # as if killed between that batch's PNGs and its record
    (work / "chunks" / "c000001.json.tmp-99").write_text("{")
    other = tokscale(gpt, tmp_path / "resumed", "--tokenizer", tok, *COMMON[:-1], "3")
    assert (
        other.returncode != 0 and "other settings" in error_line(other) and "batch_size" in error_line(other)
    )
    again = tokscale(gpt, tmp_path / "resumed", "--tokenizer", tok, *COMMON)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "1 of 5 chunks finished before" in again.stderr
    assert codes_of(tmp_path / "resumed") == codes_of(tmp_path / "whole")
    assert not work.exists()
