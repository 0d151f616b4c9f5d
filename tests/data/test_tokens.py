"""Token shards: compact storage, identity checks, exact rank split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokscale.data.samples import ShardError
from tokscale.data.tokens import (
    TokenShardReader,
    TokenShardWriter,
    load_tokens,
    merge_manifests,
    token_stream,
)


def _write(out, n=7, codebook_size=16384, num_tokens=5, tokenizer_id="vq2d-tiny.test", prefix="r000"):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, codebook_size, (n, num_tokens))
    with TokenShardWriter(
        out, tokenizer_id, codebook_size, num_tokens, samples_per_shard=3, prefix=prefix
    ) as w:
        for i in range(n):
            w.write(f"img{i}", torch.from_numpy(tokens[i]), label=i % 4, aug_id=i % 10)
    return tokens


def test_token_shards_round_trip_tokens_labels_augmentation_ids_and_keys(tmp_path):
    tokens = _write(tmp_path)
    data = load_tokens(str(tmp_path / "*.tar"), tokenizer_id="vq2d-tiny.test", codebook_size=16384)
    assert torch.equal(data["tokens"], torch.from_numpy(tokens))
    assert data["labels"].tolist() == [i % 4 for i in range(7)]
    assert data["aug_ids"].tolist() == list(range(7))
    assert data["keys"] == [f"img{i}" for i in range(7)]


def test_tokens_are_stored_as_uint16_when_the_codebook_fits_and_int32_otherwise(tmp_path):
    _write(tmp_path / "small")
    _write(tmp_path / "big", codebook_size=100_000)
    assert TokenShardReader(str(tmp_path / "small" / "r000-000000.tar")).tokens.dtype == np.uint16
    big = TokenShardReader(str(tmp_path / "big" / "r000-000000.tar"))
    assert big.tokens.dtype == np.int32 and big[0][0].dtype == torch.int64


def test_reading_with_another_tokenizer_identity_or_codebook_size_is_refused(tmp_path):
    _write(tmp_path)
    shard = str(tmp_path / "r000-000000.tar")
    with pytest.raises(ValueError, match="tokenizer_id is 'vq2d-tiny.test', expected 'other'"):
        TokenShardReader(shard, tokenizer_id="other")
    with pytest.raises(ValueError, match="codebook_size is 16384, expected 4096"):
        list(token_stream(shard, codebook_size=4096))


def test_writing_out_of_range_or_wrong_length_tokens_is_an_error(tmp_path):
    w = TokenShardWriter(tmp_path, "t", codebook_size=8, num_tokens=3)
    with pytest.raises(ValueError, match="outside codebook_size=8"):
        w.write("a", np.array([1, 2, 8]), 0)
    with pytest.raises(ValueError, match="2 tokens, expected num_tokens=3"):
        w.write("a", np.array([1, 2]), 0)


def test_token_stream_splits_samples_exactly_across_ranks_in_a_seeded_order(tmp_path):
    _write(tmp_path, n=10)
    pattern = str(tmp_path / "r000-{000000..000003}.tar")
    per_rank = [
        [t.tolist() for t, _, _ in token_stream(pattern, rank=r, world_size=3, seed=5)] for r in range(3)
    ]
    flat = [tuple(t) for tokens in per_rank for t in tokens]
    assert [len(p) for p in per_rank] == [4, 3, 3] and len(set(flat)) == 10
    assert per_rank[0] == [t.tolist() for t, _, _ in token_stream(pattern, rank=0, world_size=3, seed=5)]


def test_manifests_of_several_writers_merge_and_must_agree_on_the_tokenizer(tmp_path):
    _write(tmp_path, n=4, prefix="r000")
    _write(tmp_path, n=5, prefix="r001")
    merged = merge_manifests(tmp_path)
    assert merged["num_samples"] == 9 and len(merged["shards"]) == 4
    _write(tmp_path, n=2, prefix="r002", tokenizer_id="another")
    with pytest.raises(ValueError, match="different tokenizers"):
        merge_manifests(tmp_path)


def test_a_truncated_token_shard_is_a_shard_error(tmp_path):
    _write(tmp_path)
    path = tmp_path / "r000-000000.tar"
    path.write_bytes(path.read_bytes()[:700])
    with pytest.raises(ShardError, match="r000-000000.tar"):
        TokenShardReader(str(path))
