"""`tokscale extract`: token shards that round-trip through the tokenizer, a stopped extraction that resumes
to the same shards, two ranks that store each image once, and the ten-crop layout."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1] / "evaluation"))
from palette import write_tiny_export  # noqa: E402

from tokscale.data.locations import resolve_shards  # noqa: E402
from tokscale.data.samples import decode_image, iter_raw_samples, sample_label  # noqa: E402
from tokscale.data.tokens import load_tokens  # noqa: E402
from tokscale.data.transforms import adm_center_crop, to_tensor  # noqa: E402
from tokscale.tokenizers.extract import ExtractConfig, crops  # noqa: E402
from tokscale.tokenizers.load import load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "2d-tiny-32"
    write_tiny_export(out)
    return out


def tokscale(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tokscale.cli", *args], capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
    )  # fmt: skip


def shard_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def run_extract(cfg: ExtractConfig, stop_after_first_shard: bool = False) -> dict:
    """main() in its own process (it sets up and tears down a process group, which must not happen in the test
    process: later in-process DeepSpeed engines would find their group gone)."""
    code = (
        "import json, sys\n"
        "from tokscale.tokenizers.extract import load_config, main\n"
        "cfg = load_config(None, sys.argv[2:])\n"
        "stop = (lambda: True) if sys.argv[1] == '1' else None\n"
        "print('RESULT ' + json.dumps(main(cfg, stop)))\n"
    )
    dots = [f"{k}={v}" for k, v in vars(cfg).items() if v != ""]
    res = subprocess.run(
        [sys.executable, "-c", code, "1" if stop_after_first_shard else "0", *dots],
        capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def extracted(tiny_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokens") / "eval"
    res = tokscale("extract", str(tiny_export), "--data", "embedded", "--split", "eval", str(out),
                   "--aug", "center_flip", "--batch-size", "48")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_stored_codes_decode_as_the_tokenizer_encodes_each_crop_and_its_flip(tiny_export, extracted):
    manifest = json.loads((extracted / "manifest.json").read_text())
    assert manifest["num_samples"] == 200 and manifest["augmentation"] == "center_flip"
    assert manifest["num_augs"] == 2 and manifest["format"] == "tokscale-tokens/2"
    assert manifest["resolution"] == 32 and len(manifest["tokenizer_config_sha256"]) == 64
    stored = load_tokens(str(extracted), tokenizer_id=manifest["tokenizer_id"])
    model = load_tokenizer(tiny_export)
    url = resolve_shards("embedded", "eval")[0]
    samples = list(iter_raw_samples(url))[:5]
    assert stored["tokens"].shape == (200, 2, model.num_tokens) and stored["labels"].shape == (200,)
    assert len(set(stored["keys"])) == len(stored["keys"]) == 200  # every image of the split once
    index = {k: i for i, k in enumerate(stored["keys"])}
    for s in samples:
        crop = adm_center_crop(decode_image(s), 32)
        for aug, arr in enumerate([crop, crop[:, ::-1]]):  # augmentation a in position a
            x = to_tensor(np.ascontiguousarray(arr))[None]
            codes = stored["tokens"][index[s.key], aug][None]
            assert torch.equal(codes, model.encode(x))
            assert torch.equal(model.decode(codes), model.decode(model.encode(x)))
        assert stored["labels"][index[s.key]] == sample_label(s)


def test_a_stopped_extraction_resumes_and_ends_with_the_same_shards(tiny_export, extracted, tmp_path):
    out = tmp_path / "resumed"
    cfg = ExtractConfig(
        tokenizer=str(tiny_export), data="embedded", split="eval", out=str(out), aug="center_flip",
        batch_size=48, progress=False,
    )  # fmt: skip
    first = run_extract(cfg, stop_after_first_shard=True)  # stops after its first finished shard
    # The shards are made in the work folder; OUT appears only when every shard is finished.
    assert first["status"] == "stopped" and len(list(cfg.work.glob("*.tar"))) == 1 and not out.exists()
    (cfg.work / "s000001-000000.tar.tmp-999").write_bytes(b"partial")  # a crashed writer's leftover
    again = run_extract(cfg)
    assert again["status"] == "finished" and again["images"] == 75  # only the unfinished shard was redone
    assert shard_digests(out) == shard_digests(extracted)
    assert not list(out.glob("*.tmp-*")) and not cfg.job_dir.exists()


def test_extract_never_writes_into_a_folder_of_other_files_and_replaces_its_own(
    tiny_export, extracted, tmp_path
):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    args = ["extract", str(tiny_export), "--data", "embedded", "--split", "eval", "--aug", "center"]
    res = tokscale(*args, str(mine))
    assert res.returncode != 0 and "notes.txt" in res.stderr and "--overwrite" in res.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "mine.extract-job" / "extract_config.yaml").exists()
    res = tokscale(*args, str(mine), "--overwrite")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / "manifest.json").is_file()
    first = json.loads((mine / "manifest.json").read_text())
    previous = tmp_path / "previous"
    shutil.copytree(extracted, previous)  # a previous extraction (center_flip): replaced whole
    res = tokscale(*args, str(previous))
    assert res.returncode == 0, res.stderr[-2000:]
    manifest = json.loads((previous / "manifest.json").read_text())
    assert manifest["augmentation"] == "center" == first["augmentation"]


def test_two_ranks_store_each_image_once(tiny_export, extracted, tmp_path):
    out = tmp_path / "two"
    res = tokscale("extract", str(tiny_export), "--data", "embedded", "--split", "eval", str(out),
                   "--aug", "center_flip", "--batch-size", "48", "--nproc", "2")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    keys = load_tokens(str(out))["keys"]
    assert len(keys) == len(set(keys)) == 200
    assert shard_digests(out) == shard_digests(extracted)  # the same bytes as one rank


def test_ten_crop_is_the_centre_and_four_corners_of_the_1_1x_crop_then_their_flips():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, size=(50, 60, 3), dtype=np.uint8))
    ten = crops(img, 32, "tencrop")
    big = adm_center_crop(img, 35)  # round(32 * 1.1)
    assert len(ten) == 10 and all(c.shape == (32, 32, 3) for c in ten)
    assert np.array_equal(ten[0], big[1:33, 1:33])
    assert np.array_equal(ten[1], big[:32, :32]) and np.array_equal(ten[4], big[3:, 3:])
    for i in range(5):
        assert np.array_equal(ten[5 + i], ten[i][:, ::-1])


def test_bad_extract_settings_are_refused_naming_the_value(tiny_export, tmp_path):
    with pytest.raises(ValueError, match="aug='fivecrop'"):
        ExtractConfig(tokenizer="t", data="d", out="o", aug="fivecrop")
    res = tokscale("extract", str(tmp_path / "nowhere"), "--data", "embedded", str(tmp_path / "o"))
    assert res.returncode != 0 and "nowhere" in res.stderr.splitlines()[0]


def test_bench_extract_prints_batched_and_batch_1_throughput_as_one_json_object():
    res = tokscale("bench", "extract", "2d-tiny", "--images", "4", "--batch", "2", "--resolution", "32")
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["benchmark"] == "extract_encode" and out["images"] == 4 and out["batch"] == 2
    assert out["images_per_s_batched"] > 0 and out["images_per_s_batch1"] > 0
    assert out["speedup"] == pytest.approx(out["images_per_s_batched"] / out["images_per_s_batch1"])


def test_a_shard_of_the_old_token_format_counts_as_unfinished_and_is_extracted_again(tmp_path):
    from tokscale.tokenizers.extract import _done

    manifest = tmp_path / "manifest-s000000.json"
    assert not _done(tmp_path, "s000000")
    manifest.write_text(json.dumps({"format": "tokscale-tokens/1", "shards": []}))
    assert not _done(tmp_path, "s000000")  # one row per augmentation: redone as tokscale-tokens/2
    manifest.write_text(json.dumps({"format": "tokscale-tokens/2", "shards": []}))
    assert _done(tmp_path, "s000000")
