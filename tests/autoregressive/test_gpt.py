"""The GPT, its presets and its sampler on the CPU, at tiny sizes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tokscale.autoregressive.gpt import GPT, GPTConfig, apply_rope, param_counts, rope_2d
from tokscale.autoregressive.presets import PARAMS, get_preset, list_presets, preset_config
from tokscale.autoregressive.sample import SampleConfig, filter_logits, generate, guidance_scales
from tokscale.config import ConfigError


def tiny(position: str = "rope2d", **kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(width=64, depth=2, heads=4, vocab_size=64, num_tokens=16, num_classes=10, position=position)
    model = GPT(GPTConfig(**{**cfg, **kw}))
    torch.nn.init.normal_(model.head.weight, std=0.5)  # the zero-initialised head would make every logit 0
    return model


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_builds_on_meta_with_the_reference_parameter_count(name):
    with torch.device("meta"):
        model = GPT(preset_config(name))
    assert param_counts(model)["params"] == PARAMS[name]


def test_1d_presets_add_one_position_row_per_token_and_the_class():
    for size in ("B", "L", "XL", "XXL", "3B"):
        width = get_preset(f"gpt-{size}")["width"]
        assert PARAMS[f"gpt-{size}-1d"] - PARAMS[f"gpt-{size}"] == 257 * width
    with pytest.raises(ValueError, match="unknown GPT preset"):
        get_preset("gpt-XS")


def test_model_info_prints_one_json_object_for_the_largest_presets_quickly():
    code = "from tokscale.cli import main; main(['model', 'info', 'gpt-3B']); main(['model', 'info', 'gpt-B-1d'])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    big, small = (json.loads(line) for line in out.stdout.strip().splitlines())
    assert big["params"] == 3_096_659_200 and big["head_dim"] == 100 and big["ffn_hidden"] == 8704
    assert (big["width"], big["depth"], big["heads"], big["vocab_size"], big["num_tokens"]) == (
        3200,
        24,
        32,
        16384,
        256,
    )
    assert small["params"] == 111_085_824 and small["position"] == "learned"


def test_bad_config_values_name_the_key():
    for kw, key in (
        ({"position": "rope1d"}, "model.position"),
        ({"width": 100, "heads": 3}, "model.width"),
        ({"num_tokens": 15}, "model.num_tokens=15 is not a square grid"),
        ({"width": 72, "heads": 4}, "multiple of 4"),
        ({"class_dropout": 1.0}, "model.class_dropout"),
        ({"depth": 0}, "model.depth"),
        ({"ffn_dim_multiplier": -1.0}, "model.ffn_dim_multiplier"),
    ):
        with pytest.raises(ValueError, match=key):
            GPTConfig(**kw)
    GPTConfig(num_tokens=15, position="learned")  # a 1D tokenizer of any length
    with pytest.raises(ConfigError, match="model.position"):
        preset_config("gpt-tiny", ["position=abs"])
    for kw, key in (
        ({"cfg_schedule": "cosine"}, "sample.cfg_schedule"),
        ({"top_p": 0.0}, "sample.top_p"),
        ({"top_k": -1}, "sample.top_k"),
        ({"cfg_start_ratio": 1.5}, "sample.cfg_start_ratio"),
        ({"temperature": -1.0}, "sample.temperature"),
    ):
        with pytest.raises(ValueError, match=key):
            SampleConfig(**kw)


def test_bad_inputs_are_value_errors():
    model = tiny().eval()
    with pytest.raises(ValueError, match="tokens must be"):
        model(torch.zeros(2, 17, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be in 0..10"):
        generate(model, torch.tensor([11]))
    with pytest.raises(ValueError, match="layer must be"):
        model.features(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, dtype=torch.long), layer=3)


@pytest.mark.parametrize("position", ["rope2d", "learned"])
def test_cached_decoding_gives_the_teacher_forced_logits(position):
    model = tiny(position, qk_norm=True).eval()
    tokens, labels = torch.randint(0, 64, (3, 16)), torch.tensor([0, 4, 10])
    with torch.no_grad():
        full = model(tokens, labels)
        cache = model.new_cache(3)
        steps = [model.decode(cache, 0, labels_B=labels)]
        steps += [model.decode(cache, t, tokens_BL=tokens[:, t - 1 : t]) for t in range(1, 16)]
        prefix = [model.last_logits(labels, tokens[:, :t]) for t in range(16)]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(prefix, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "sample",
    [
        SampleConfig(),
        SampleConfig(temperature=0.7, top_k=8),
        SampleConfig(cfg_scale=3.0, cfg_schedule="constant", top_p=0.8),
        SampleConfig(cfg_scale=2.0, cfg_schedule="linear", top_k=20, top_p=0.95),
        SampleConfig(cfg_scale=1.75, cfg_schedule="step", cfg_start_ratio=0.3),
        SampleConfig(cfg_scale=2.0, cfg_interval=4),
    ],
)
@pytest.mark.parametrize("position", ["rope2d", "learned"])
def test_kv_cache_sampling_gives_the_same_tokens_as_recomputing_the_prefix(sample, position):
    model = tiny(position)
    labels = torch.tensor([1, 3, 5, 7])
    cached = generate(model, labels, sample, torch.Generator().manual_seed(1))
    plain = generate(model, labels, sample, torch.Generator().manual_seed(1), use_cache=False)
    assert cached.shape == (4, 16) and cached.dtype == torch.long
    assert torch.equal(cached, plain)
    assert model.training  # generate() restores the mode it found
    other = generate(model, labels, sample, torch.Generator().manual_seed(2))
    assert not torch.equal(cached, other)  # the generator decides the draw


def test_guidance_follows_gigatoks_schedules_and_the_prefill_always_gets_the_full_scale():
    s, T = 2.0, 256
    assert guidance_scales(SampleConfig(cfg_scale=1.0, cfg_schedule="step"), T) == [None] * T
    assert guidance_scales(SampleConfig(cfg_scale=s), T) == [s] * T
    step = guidance_scales(SampleConfig(cfg_scale=s, cfg_schedule="step"), T)
    # ratio = i / 255 for token i >= 1: tokens 1-45 are (almost) unguided, 46-255 guided
    assert step[0] == s and set(step[1:46]) == {1.0001} and set(step[46:]) == {s}
    linear = guidance_scales(SampleConfig(cfg_scale=s, cfg_schedule="linear"), T)
    assert (
        linear[0] == s
        and linear[-1] == pytest.approx(s + 1e-4)
        and linear[1] == pytest.approx(1 + 1 / 255 + 1e-4)
    )
    interval = guidance_scales(SampleConfig(cfg_scale=s, cfg_interval=3), T)
    assert interval[:5] == [s] * 5 and set(interval[5:]) == {None}


def test_guided_sampling_mixes_logits_before_filtering():
    """With CFG, top_k=1 picks the argmax of uncond + s * (cond - uncond), which the cond logits alone need not
    share: checked on token 0 against logits computed by hand."""
    model = tiny().eval()
    labels = torch.arange(6)
    with torch.no_grad():
        cond = model.last_logits(labels, torch.zeros(6, 0, dtype=torch.long))
        uncond = model.last_logits(torch.full_like(labels, 10), torch.zeros(6, 0, dtype=torch.long))
    mixed = uncond + 4.0 * (cond - uncond)
    codes = generate(model, labels, SampleConfig(cfg_scale=4.0, top_k=1))
    assert torch.equal(codes[:, 0], mixed.argmax(-1))


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.1)).tolist() == [[True, False, False, False]]


def test_training_drops_labels_to_the_null_class_and_eval_does_not():
    model = tiny(class_dropout=0.5, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    tokens, labels = torch.randint(0, 64, (256, 4)), torch.full((256,), 3)
    null = torch.full((256,), 10)
    with torch.no_grad():
        torch.manual_seed(0)
        train = model.train()(tokens, labels)
        as_label, as_null = model.eval()(tokens, labels), model(tokens, null)
    dropped = (train - as_null).abs().amax((1, 2)) < 1e-6
    kept = (train - as_label).abs().amax((1, 2)) < 1e-6
    assert torch.all(dropped ^ kept) and 80 < int(dropped.sum()) < 176


def test_activation_checkpointing_gives_the_same_gradients():
    plain = tiny(token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    remat = tiny(token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0, grad_checkpointing=True)
    remat.load_state_dict(plain.state_dict())
    tokens, labels = torch.randint(0, 64, (2, 16)), torch.tensor([1, 2])
    for m in (plain, remat):
        torch.manual_seed(0)  # the same class-dropout draw for both
        torch.nn.functional.cross_entropy(m(tokens, labels).flatten(0, 1), tokens.flatten()).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), remat.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=0, msg=name)


def test_fresh_model_has_a_zero_head_a_null_class_row_and_a_position_table_only_in_1d():
    model = GPT(GPTConfig(width=64, depth=1, heads=4, vocab_size=32, num_tokens=16, num_classes=4))
    assert torch.count_nonzero(model.head.weight) == 0
    assert len(model.class_embed.weight) == 5  # num_classes + the null class
    assert model.pos_embed is None
    learned = GPT(GPTConfig(width=64, depth=1, heads=4, num_tokens=16, position="learned"))
    assert learned.pos_embed.shape == (17, 64)


def test_rope_gives_the_class_position_zero_and_token_positions_their_grid_cell():
    cfg = GPTConfig(width=64, depth=1, heads=4, num_tokens=16)  # head_dim 16: 4 row + 4 column frequencies
    table = rope_2d(torch.arange(17), cfg)  # (17, 8, 2)
    assert torch.count_nonzero(table[0]) == 0
    freqs = 1.0 / 10000 ** (torch.arange(4) * 2 / 8)
    row, col = divmod(7 - 1, 4)  # position 7 carries token 6: cell (1, 2)
    angles = torch.cat([row * freqs, col * freqs])
    torch.testing.assert_close(table[7], torch.stack([angles.cos(), angles.sin()], -1))
    x = torch.randn(1, 17, 1, 16)
    rotated = apply_rope(x, table)
    assert torch.count_nonzero(rotated[:, 0]) == 0  # the class query and key vanish
    torch.testing.assert_close(rotated.norm(dim=-1)[:, 1:], x.norm(dim=-1)[:, 1:])
