import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from tokscale.tokenizers.model import TokenizerConfig, VQTokenizer, multilevel_pool, param_counts
from tokscale.tokenizers.presets import PRESETS, RELEASED_PARAMS, get_preset
from tokscale.tokenizers.transformer import token_mask


def config(name: str, **over) -> TokenizerConfig:
    merged = OmegaConf.merge(OmegaConf.structured(TokenizerConfig), get_preset(name), over)
    return OmegaConf.to_object(merged)


@pytest.mark.parametrize("name", sorted(RELEASED_PARAMS))
def test_every_gigatok_preset_has_exactly_the_released_configs_parameter_count(name):
    with torch.device("meta"):
        model = VQTokenizer(config(name))
    counts = param_counts(model)
    assert counts["params"] == RELEASED_PARAMS[name]
    assert counts["params"] == (
        counts["encoder_params"]
        + counts["decoder_params"]
        + counts["codebook_params"]
        + counts["semantic_projector_params"]
    )


def test_cnn_parts_match_gigatok_sizes():
    with torch.device("meta"):
        counts = param_counts(VQTokenizer(config("1d-S-S")))
    assert abs(counts["cnn_encoder_params"] / 26.14e6 - 1) < 0.001
    assert abs(counts["cnn_decoder_params"] / 50.16e6 - 1) < 0.001
    assert abs(counts["semantic_projector_params"] / 6.8e6 - 1) < 0.01


@pytest.mark.parametrize("name", ["2d-tiny", "1d-tiny"])
def test_tiny_presets_run_forward_and_backward(name):
    torch.manual_seed(0)
    model = VQTokenizer(config(name, image_size=64, num_tokens=16))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = model(x, capture_layer=2)
    assert out["recon"].shape == x.shape
    assert out["indices"].shape == (2, 16)
    assert out["semantic"].shape == (2, 16, model.config.semantic_dim)
    loss = out["recon"].pow(2).mean() + out["loss_commit"] + out["loss_codebook"] + out["semantic"].mean()
    loss.backward()
    for name_, p in model.named_parameters():
        assert p.grad is not None, f"{name_} received no gradient"


def test_encode_decode_round_trip_shapes_and_dtypes():
    model = VQTokenizer(config("2d-tiny", image_size=32)).eval()
    codes = model.encode(torch.zeros(3, 3, 32, 32))
    assert codes.dtype == torch.int64 and codes.shape == (3, 4)
    assert int(codes.max()) < model.codebook_size
    assert model.decode(codes).shape == (3, 3, 32, 32)


def test_one_d_decoder_reconstructs_from_a_prefix_and_causal_tokens_ignore_later_ones():
    torch.manual_seed(0)
    model = VQTokenizer(
        config(
            "1d-tiny", image_size=64, num_tokens=16, token_mask="block_causal", causal_prefix=4, group_size=4
        )
    ).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    codes = model.encode(x)
    assert model.decode(codes[:, :8]).shape == x.shape
    # latents of the first tokens depend only on queries up to their group, not on later query positions
    with torch.no_grad():
        before = model.encode_latents(x)[:, :8].clone()
        model.encoder.token_pos[8:] += 1.0
        after = model.encode_latents(x)
    assert torch.allclose(before, after[:, :8], atol=1e-5)
    assert not torch.allclose(before, after[:, 8:16], atol=1e-3)


def test_block_causal_mask_layout():
    m = token_mask("block_causal", 12, causal_prefix=4, group_size=4)
    assert m[1, 1] and not m[1, 2]  # strictly causal prefix
    assert m[4, 7] and m[7, 4] and not m[7, 8]  # a block sees itself, not the next block
    assert token_mask("none", 5) is None
    assert torch.equal(token_mask("causal", 4), torch.tril(torch.ones(4, 4, dtype=torch.bool)))


def test_query_initialisation_pools_gigatoks_row_first_pyramid():
    grid = torch.arange(16.0).reshape(1, 1, 4, 4)
    q = multilevel_pool(grid, 8)
    assert q.shape == (1, 8, 1)
    assert q[0, 0, 0] == grid.mean() and q[0, 1, 0] == grid.mean()  # tokens 0 and 1: the global average
    assert torch.allclose(q[0, 2:4, 0], torch.tensor([6.5, 8.5]))  # level 1: left and right halves
    assert torch.allclose(
        q[0, 4:8, 0], torch.tensor([2.5, 4.5, 10.5, 12.5])
    )  # level 2: the quadrants, by row


def test_bad_model_config_values_name_the_key():
    with pytest.raises(ValueError, match="model.kind"):
        TokenizerConfig(kind="3d")
    with pytest.raises(ValueError, match="token_mask"):
        TokenizerConfig(kind="2d", token_mask="causal")
    with pytest.raises(ValueError, match="model.num_tokens must be a power of two"):
        TokenizerConfig(kind="1d", num_tokens=12)
    with pytest.raises(ValueError, match="model.layer_type"):
        TokenizerConfig(kind="1d", layer_type="plain")


def test_model_info_builds_the_largest_preset_without_allocating_its_weights():
    # The child prints the JSON, then its own peak RSS (KiB): 2.89B fp32 weights would need 11.6 GB.
    code = (
        "import resource; from tokscale.cli import main; main(['model', 'info', '1d-XL-XXL']); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line, peak_kib = out.stdout.strip().splitlines()[-2:]
    info = json.loads(line)
    assert info["params"] == 2_893_970_443
    for key in ("encoder_params", "decoder_params", "num_tokens", "codebook_size", "code_dim"):
        assert key in info
    assert info["num_tokens"] == 256 and info["codebook_size"] == 16384 and info["code_dim"] == 8
    assert int(peak_kib) < 4 * 2**20  # under 4 GiB


def test_preset_table_names():
    assert {
        "1d-S-S",
        "1d-S-B",
        "1d-B-L",
        "1d-XL-XXL",
        "2d-S-S",
        "2d-S-B",
        "2d-B-L",
        "1d-tiny",
        "2d-tiny",
    } <= set(PRESETS)
    with pytest.raises(ValueError, match="unknown tokenizer preset"):
        get_preset("2d-XXXL")


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = VQTokenizer(config("1d-tiny", image_size=32, num_tokens=8))
    ckpt = VQTokenizer(config("1d-tiny", image_size=32, num_tokens=8, grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for m in (plain, ckpt):
        out = m(x, capture_layer=1)
        (
            out["recon"].pow(2).mean() + out["semantic"].mean() + out["loss_commit"] + out["loss_codebook"]
        ).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
