"""Token shards: each image once with all its augmentations, compact storage, identity checks, exact rank split,
and format-1 shards (one row per augmentation) refused."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from tokscale.data.samples import ShardError
from tokscale.data.tokens import (
    TokenShardReader,
    TokenShardWriter,
    TokenTrainStream,
    load_tokens,
    merge_manifests,
    token_stream,
)


def _write(
    out, n=7, codebook_size=16384, num_tokens=5, num_augs=3, tokenizer_id="vq2d-tiny.test", prefix="r000"
):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, codebook_size, (n, num_augs, num_tokens))
    with TokenShardWriter(
        out, tokenizer_id, codebook_size, num_tokens, num_augs=num_augs, samples_per_shard=3, prefix=prefix
    ) as w:
        for i in range(n):
            w.write(f"img{i}", torch.from_numpy(tokens[i]), label=i % 4)
    return tokens


def test_token_shards_round_trip_each_image_once_with_all_its_augmentations(tmp_path):
    tokens = _write(tmp_path)
    data = load_tokens(str(tmp_path / "*.tar"), tokenizer_id="vq2d-tiny.test", codebook_size=16384)
    assert data.keys() == {"tokens", "labels", "keys"}
    assert data["tokens"].shape == (7, 3, 5) and torch.equal(data["tokens"], torch.from_numpy(tokens))
    assert data["labels"].tolist() == [i % 4 for i in range(7)]
    assert data["keys"] == [f"img{i}" for i in range(7)]
    shard = TokenShardReader(str(tmp_path / "r000-000000.tar"))
    assert shard.meta["num_augs"] == 3 and shard.meta["count"] == 3 and shard.tokens.shape == (3, 3, 5)
    with tarfile.open(tmp_path / "r000-000000.tar") as tar:
        assert tar.getnames() == ["meta.json", "tokens.npy", "labels.npy", "keys.json"]
    manifest = json.loads((tmp_path / "manifest-r000.json").read_text())
    assert manifest["num_augs"] == 3 and manifest["num_samples"] == 7
    assert manifest["format"] == "tokscale-tokens/2"


def test_a_single_augmentation_writer_takes_a_flat_code_vector(tmp_path):
    with TokenShardWriter(tmp_path, "t", codebook_size=8, num_tokens=3) as w:
        w.write("a", np.array([1, 2, 7]), 0)
        w.write("b", torch.tensor([[0, 1, 2]]), 1)
    data = load_tokens(str(tmp_path))
    assert data["tokens"].tolist() == [[[1, 2, 7]], [[0, 1, 2]]]


def test_tokens_are_stored_as_uint16_when_the_codebook_fits_and_int32_otherwise(tmp_path):
    _write(tmp_path / "small")
    _write(tmp_path / "big", codebook_size=100_000)
    assert TokenShardReader(str(tmp_path / "small" / "r000-000000.tar")).tokens.dtype == np.uint16
    big = TokenShardReader(str(tmp_path / "big" / "r000-000000.tar"))
    assert big.tokens.dtype == np.int32 and big[0][0].dtype == torch.int64 and big[0][0].shape == (3, 5)


def test_reading_with_another_tokenizer_identity_or_codebook_size_is_refused(tmp_path):
    _write(tmp_path)
    shard = str(tmp_path / "r000-000000.tar")
    with pytest.raises(ValueError, match="tokenizer_id is 'vq2d-tiny.test', expected 'other'"):
        TokenShardReader(shard, tokenizer_id="other")
    with pytest.raises(ValueError, match="codebook_size is 16384, expected 4096"):
        list(token_stream(shard, codebook_size=4096))


def test_writing_out_of_range_or_wrongly_shaped_codes_is_an_error_naming_the_key_and_shapes(tmp_path):
    w = TokenShardWriter(tmp_path, "t", codebook_size=8, num_tokens=3, num_augs=2)
    with pytest.raises(ValueError, match="outside codebook_size=8"):
        w.write("a", np.array([[1, 2, 8], [0, 0, 0]]), 0)
    with pytest.raises(ValueError, match=r"'a': codes of shape \(2, 2\), expected .* = \(2, 3\)"):
        w.write("a", np.array([[1, 2], [3, 4]]), 0)
    with pytest.raises(ValueError, match=r"'b': codes of shape \(3,\), expected .* = \(2, 3\)"):
        w.write("b", np.array([1, 2, 3]), 0)  # a flat vector only when num_augs is 1
    with pytest.raises(ValueError, match=r"'c': codes of shape \(2,\), expected .* = \(1, 3\)"):
        TokenShardWriter(tmp_path, "t", codebook_size=8, num_tokens=3).write("c", np.array([1, 2]), 0)


def test_token_stream_splits_images_exactly_across_ranks_in_a_seeded_order(tmp_path):
    _write(tmp_path, n=10)
    pattern = str(tmp_path / "r000-{000000..000003}.tar")
    per_rank = [
        [t.tolist() for t, _ in token_stream(pattern, rank=r, world_size=3, seed=5)] for r in range(3)
    ]
    flat = [json.dumps(t) for tokens in per_rank for t in tokens]
    assert [len(p) for p in per_rank] == [4, 3, 3] and len(set(flat)) == 10
    assert all(np.shape(t) == (3, 5) for t in per_rank[0])
    assert per_rank[0] == [t.tolist() for t, _ in token_stream(pattern, rank=0, world_size=3, seed=5)]


def test_manifests_of_several_writers_merge_and_must_agree_on_the_tokenizer(tmp_path):
    _write(tmp_path, n=4, prefix="r000")
    _write(tmp_path, n=5, prefix="r001")
    merged = merge_manifests(tmp_path)
    assert merged["num_samples"] == 9 and len(merged["shards"]) == 4 and merged["num_augs"] == 3
    _write(tmp_path, n=2, prefix="r002", tokenizer_id="another")
    with pytest.raises(ValueError, match="different tokenizers"):
        merge_manifests(tmp_path)


def test_shards_with_different_augmentation_counts_do_not_merge_or_load_together(tmp_path):
    _write(tmp_path, n=4, prefix="r000", num_augs=3)
    _write(tmp_path, n=2, prefix="r001", num_augs=1)
    with pytest.raises(
        ValueError, match=r"different num_augs .*'manifest-r000.json': 3, 'manifest-r001.json': 1"
    ):
        merge_manifests(tmp_path)
    with pytest.raises(ValueError, match="different num_augs .*r001-000000.tar"):
        load_tokens(str(tmp_path))
    with pytest.raises(ValueError, match="different num_augs"):
        TokenTrainStream(str(tmp_path), batch_size=1)


def _write_format_1_shard(path):
    """A shard as tokscale-tokens/1 wrote it: one row per augmentation, with aug_ids.npy."""

    def npy(arr):
        buf = io.BytesIO()
        np.save(buf, arr)
        return buf.getvalue()

    meta = {
        "format": "tokscale-tokens/1",
        "tokenizer_id": "t",
        "codebook_size": 8,
        "num_tokens": 3,
        "count": 2,
    }
    members = {
        "meta.json": json.dumps({**meta, "dtype": "uint16"}).encode(),
        "tokens.npy": npy(np.zeros((2, 3), np.uint16)),
        "labels.npy": npy(np.zeros(2, np.int32)),
        "aug_ids.npy": npy(np.array([0, 1], np.int16)),
        "keys.json": json.dumps(["a", "a"]).encode(),
    }
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.with_name("manifest-old.json").write_text(json.dumps({**meta, "num_samples": 2, "shards": []}))


def test_format_1_shards_are_refused_naming_the_file_and_saying_to_extract_again(tmp_path):
    old = tmp_path / "old-000000.tar"
    _write_format_1_shard(old)
    for read in (
        lambda: TokenShardReader(str(old)),
        lambda: list(token_stream(str(old))),
        lambda: load_tokens(str(tmp_path)),
        lambda: TokenTrainStream(str(old), batch_size=1),
    ):
        with pytest.raises(
            ShardError, match=r"old-000000.tar: format 'tokscale-tokens/1' .*`tokscale extract`"
        ):
            read()
    with pytest.raises(
        ValueError, match=r"manifest-old.json: format 'tokscale-tokens/1' .*`tokscale extract`"
    ):
        merge_manifests(tmp_path)


def test_a_truncated_token_shard_is_a_shard_error(tmp_path):
    _write(tmp_path)
    path = tmp_path / "r000-000000.tar"
    path.write_bytes(path.read_bytes()[:700])
    with pytest.raises(ShardError, match="r000-000000.tar"):
        TokenShardReader(str(path))
