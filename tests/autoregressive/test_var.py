"""The VAR next-scale transformer and its sampler: parameter counts equal VAR's own constructor, the mask is
block-causal by scale, the cached sampler draws exactly the tokens of the one that recomputes the prefix, the KV
budget keeps the coarse scales and its share of the rest, and collaborative decoding hands over honestly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tokscale.autoregressive.presets import VAR_PARAMS, VAR_PRESETS, var_preset_config
from tokscale.autoregressive.var import VAR, VARConfig, var_param_counts
from tokscale.autoregressive.var_sample import BudgetCache, VARSampleConfig, generate_var

SCALES = [1, 2, 3, 4, 6]
VOCAB, DIM, CLASSES = 32, 4, 5


class PyramidStandIn:
    """A multi-scale residual code pyramid with the MultiScaleQuantizer's sampling contract (``scales``,
    ``next_scale``, ``var_input``): codes are looked up in a random table, upsampled to the grid and summed; the
    next input is f_hat area-downsampled. Enough for the transformer's tests without a trained tokenizer."""

    def __init__(self, scales=SCALES, vocab=VOCAB, dim=DIM, seed=0):
        self.scales = tuple(scales)
        self.codebook = torch.randn(vocab, dim, generator=torch.Generator().manual_seed(seed))

    def next_scale(self, f_hat, idx, k):
        p, grid = self.scales[k], self.scales[-1]
        h = self.codebook[idx].transpose(1, 2).reshape(idx.shape[0], -1, p, p)
        h = F.interpolate(h, size=(grid, grid), mode="bicubic") if p != grid else h
        f_hat = h if f_hat is None else f_hat + h
        if k == len(self.scales) - 1:
            return f_hat, None
        return f_hat, F.adaptive_avg_pool2d(f_hat, self.scales[k + 1]).flatten(2).transpose(1, 2)

    def split(self, codes):
        bounds = [0]
        for p in self.scales:
            bounds.append(bounds[-1] + p * p)
        return [codes[:, a:b] for a, b in zip(bounds, bounds[1:])]

    def var_input(self, idx_list):
        f_hat, out = None, []
        for k in range(len(self.scales) - 1):
            f_hat, nxt = self.next_scale(f_hat, idx_list[k], k)
            out.append(nxt)
        return torch.cat(out, dim=1)


def tiny(seed=0, **over) -> VAR:
    torch.manual_seed(seed)
    kw = dict(width=32, depth=2, heads=2, vocab_size=VOCAB, code_dim=DIM, scales=SCALES, num_classes=CLASSES)
    model = VAR(VARConfig(**{**kw, **over}))
    with torch.no_grad():  # VAR's init zeroes the gates and shrinks the head: make every path matter
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def var_reference_count(depth: int, vocab=4096, cvae=32, scales=10, tokens=680, classes=1000) -> int:
    """The parameters VAR's constructor (models/var.py, basic_var.py; shared_aln=False, attn_l2_norm=True)
    creates at depth d, read off its modules: per block mat_qkv (3 C^2), q_bias + v_bias (2 C), scale_mul_1H11
    (H), proj (C^2 + C), fc1 (4 C^2 + 4 C), fc2 (4 C^2 + C), ada_lin (6 C^2 + 6 C); word_embed (Cvae C + C),
    class_emb ((classes + 1) C), pos_start (C), pos_1LC (L C), lvl_embed (K C), head_nm.ada_lin (2 C^2 + 2 C),
    head (C V + V)."""
    c, h = 64 * depth, depth
    block = 3 * c * c + 2 * c + h + c * c + c + 4 * c * c + 4 * c + 4 * c * c + c + 6 * c * c + 6 * c
    outside = (
        (cvae + 1) * c + (classes + 1) * c + c + tokens * c + scales * c + 2 * c * c + 2 * c + (c + 1) * vocab
    )
    return depth * block + outside


def test_every_var_preset_has_its_recorded_parameter_count_and_the_published_ones_equal_vars_constructor():
    assert set(VAR_PARAMS) == set(VAR_PRESETS)
    for name in VAR_PRESETS:
        with torch.device("meta"):
            model = VAR(var_preset_config(name))
        assert var_param_counts(model)["params"] == VAR_PARAMS[name], name
    for depth in (12, 16, 20, 24, 30):
        assert VAR_PARAMS[f"var-d{depth}"] == var_reference_count(depth)
    assert VAR_PARAMS["var-d16"] == 310_283_520  # VAR's "310M"
    cfg = var_preset_config("var-d16")
    assert (cfg.width, cfg.heads, cfg.num_tokens, cfg.drop_path) == (
        1024,
        16,
        680,
        pytest.approx(0.1 * 16 / 24),
    )


def test_the_mask_lets_no_token_see_a_finer_scale_and_every_token_its_whole_scale():
    model = tiny()
    bounds, n = model.config.boundaries, model.config.num_tokens
    mask = model.block_mask(0, n)
    for k in range(len(SCALES)):
        rows = mask[bounds[k] : bounds[k + 1]]
        assert rows[:, : bounds[k + 1]].all()  # its own scale (bidirectional) and every coarser one
        assert not rows[:, bounds[k + 1] :].any()  # nothing finer


def test_changing_one_input_of_a_scale_changes_that_whole_scale_and_later_ones_but_no_earlier_logit():
    model = tiny()
    bounds = model.config.boundaries
    x = torch.randn(2, model.config.num_tokens - 1, DIM)
    labels = torch.tensor([1, 3])
    base = model(x, labels)
    k = 3  # scale 3's inputs sit at x positions bounds[3] - 1 .. bounds[4] - 2
    x2 = x.clone()
    x2[:, bounds[k] - 1] += 1.0  # the first position of scale 3 only
    moved = (model(x2, labels) - base).abs().amax(dim=(0, 2))
    assert moved[: bounds[k]].max() == 0  # coarser scales: bit-identical
    assert (moved[bounds[k] : bounds[k + 1]] > 1e-6).all()  # every position of scale 3 sees the change
    assert (moved[bounds[k + 1] :] > 1e-6).all()


def test_teacher_forcing_trains_every_parameter_and_a_prefix_of_whole_scales_gives_the_same_logits():
    model = tiny().train()
    x = torch.randn(3, model.config.num_tokens - 1, DIM)
    labels = torch.tensor([0, 1, 4])
    logits = model(x, labels)
    assert logits.shape == (3, model.config.num_tokens, VOCAB) and logits.dtype == torch.float32
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.eval()
    bounds = model.config.boundaries
    with torch.no_grad():
        full = model(x, labels)
        prefix = model(x[:, : bounds[3] - 1], labels)
    torch.testing.assert_close(prefix, full[:, : bounds[3]], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="prefix of whole scales"):
        model(x[:, :5], labels)


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_the_cached_sampler_draws_exactly_the_tokens_of_the_one_that_recomputes_the_prefix(schedule):
    model, quant = tiny(), PyramidStandIn()
    labels = torch.tensor([0, 2, 4, CLASSES])  # the null class too
    cfg = VARSampleConfig(cfg_scale=1.5, cfg_schedule=schedule, top_k=20, top_p=0.95)
    cached, s1 = generate_var(model, quant, labels, cfg, torch.Generator().manual_seed(7), return_stats=True)
    plain, s2 = generate_var(
        model, quant, labels, cfg, torch.Generator().manual_seed(7), use_cache=False, return_stats=True
    )
    assert cached.shape == (4, model.config.num_tokens) and cached.dtype == torch.long
    assert torch.equal(cached, plain)
    assert s1["forward_passes"] == s2["forward_passes"] == len(SCALES)
    bounds = model.config.boundaries
    assert s1["positions_run"] == 8 * bounds[-1]  # each position once, both CFG halves
    assert s2["positions_run"] == 8 * sum(bounds[1:])  # the whole prefix at every scale
    # the full cache holds every position of every layer once: 2 (k, v) x 8 rows x width x 4 bytes each
    assert s1["peak_kv_bytes"] == 2 * 2 * 8 * bounds[-1] * 32 * 4 and s2["peak_kv_bytes"] == 0
    other = generate_var(model, quant, labels, cfg, torch.Generator().manual_seed(8))
    assert not torch.equal(other, cached)  # the generator matters: the check above could fail


def test_the_guidance_ramp_leaves_scale_0_unguided_and_a_zero_scale_drops_the_null_half():
    model, quant = tiny(), PyramidStandIn()
    labels = torch.tensor([1, 2])
    ramp = generate_var(
        model, quant, labels, VARSampleConfig(cfg_scale=3.0), torch.Generator().manual_seed(0)
    )
    none, stats = generate_var(
        model,
        quant,
        labels,
        VARSampleConfig(cfg_scale=0.0),
        torch.Generator().manual_seed(0),
        return_stats=True,
    )
    assert torch.equal(ramp[:, :1], none[:, :1])  # t_0 = 0: scale 0 draws from the conditional logits
    assert stats["positions_run"] == 2 * model.config.num_tokens  # no null rows


def test_a_full_kv_budget_changes_nothing_and_a_small_one_keeps_the_coarse_scales_and_its_share():
    model, quant = tiny(depth=3), PyramidStandIn()
    labels = torch.tensor([0, 1, 2])
    bounds = model.config.boundaries
    runs = {}
    for budget in (1.0, 0.3, 0.1):
        cfg = VARSampleConfig(cfg_scale=1.0, kv_budget=budget, kv_keep_scales=2)
        runs[budget] = generate_var(
            model, quant, labels, cfg, torch.Generator().manual_seed(3), return_stats=True
        )
    full = generate_var(
        model, quant, labels, VARSampleConfig(cfg_scale=1.0), torch.Generator().manual_seed(3)
    )
    assert torch.equal(runs[1.0][0], full)
    peaks = [runs[b][1]["peak_kv_bytes"] for b in (1.0, 0.3, 0.1)]
    assert peaks[0] > peaks[1] > peaks[2]
    # the cache after each scale: the 2 coarse scales (5 positions) + ceil(budget x the finer positions seen)
    cache = BudgetCache(3, bounds, 0.3, keep_scales=2)
    cond = model.class_embed(labels)
    f_hat, inputs = None, []
    with torch.no_grad():
        for k in range(len(SCALES)):
            x_in = inputs[-1] if k else None
            logits = model.scale_logits(cond, x_in, k, k, cache)
            idx = logits.argmax(-1)
            f_hat, nxt = quant.next_scale(f_hat, idx, k)
            inputs.append(nxt)
            expected = min(bounds[k + 1], bounds[2] + math.ceil(0.3 * (bounds[k + 1] - bounds[2])))
            for layer in range(3):
                pos = cache.positions[layer]
                assert cache.k[layer].shape == (3, 2, expected, 16) and pos.shape == (3, 2, expected)
                assert torch.equal(
                    pos[..., : min(bounds[2], expected)],
                    torch.arange(min(bounds[2], expected)).expand(3, 2, -1),
                )
                assert (pos < bounds[k + 1]).all()
    held = sum(cache.k[i].numel() + cache.v[i].numel() for i in range(3)) * 4
    assert cache.bytes == held
    # the heads of one layer chose different entries (selection is per head)
    assert not torch.equal(cache.positions[0][:, 0], cache.positions[0][:, 1])


def test_collaborative_decoding_hands_over_at_k_with_one_forward_per_scale():
    large, quant = tiny(depth=3, width=48, heads=3), PyramidStandIn()
    small = tiny(seed=1)
    labels = torch.tensor([0, 3])
    cfg = VARSampleConfig(cfg_scale=0.0, code_handoff=3)
    codes, stats = generate_var(
        large, quant, labels, cfg, torch.Generator().manual_seed(0), small_model=small, return_stats=True
    )
    assert codes.shape == (2, large.config.num_tokens)
    assert (stats["forward_passes"], stats["forward_passes_small"]) == (3, len(SCALES) - 3)
    bounds = large.config.boundaries
    # the large model ran scales 0..2 once each; the small one 0..3 at once, then 4
    assert stats["positions_run"] == 2 * (bounds[3] + bounds[4] + bounds[5] - bounds[4])
    # the large model's draws are its own: the first 3 scales equal the plain sampler's
    plain = generate_var(
        large, quant, labels, VARSampleConfig(cfg_scale=0.0), torch.Generator().manual_seed(0)
    )
    assert torch.equal(codes[:, : bounds[3]], plain[:, : bounds[3]])
    # handing over to the same model is the plain sampler exactly (the prefix pass equals the cached passes)
    same = generate_var(large, quant, labels, cfg, torch.Generator().manual_seed(0), small_model=large)
    assert torch.equal(same, plain)
    with pytest.raises(ValueError, match="small model"):
        generate_var(large, quant, labels, cfg)
    with pytest.raises(ValueError, match="code_dim"):
        generate_var(large, quant, labels, cfg, small_model=tiny(code_dim=3))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(scales=[1, 3, 2]), "model.scales"),
        (dict(width=30, heads=4), "model.width"),
        (dict(class_dropout=1.0), "model.class_dropout"),
    ],
)
def test_a_bad_model_setting_is_an_error_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        VARConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(cfg_schedule="step"), "sample.cfg_schedule"),
        (dict(kv_budget=0.0), "sample.kv_budget"),
        (dict(code_handoff=-1), "sample.code_handoff"),
    ],
)
def test_a_bad_sampling_setting_is_an_error_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        VARSampleConfig(**kwargs)


def test_the_sampler_refuses_a_tokenizer_with_other_scales():
    with pytest.raises(ValueError, match="scales"):
        generate_var(tiny(), PyramidStandIn(scales=[1, 2, 4]), torch.tensor([0]))


def test_bench_sample_reports_speed_kv_bytes_and_passes_per_setting_and_model_info_prints_var_counts(capsys):
    import json

    from tokscale.cli import main as cli_main

    settings = "no_cache,cache,budget_0.1,code_6"
    assert cli_main(["bench", "sample", "var-tiny", "--batch", "1", "--settings", settings]) == 0
    out = json.loads(capsys.readouterr().out)
    s = out["settings"]
    assert out["benchmark"] == "var_sample" and list(s) == settings.split(",")
    assert all(r["images_per_s"] > 0 for r in s.values())
    assert (
        s["no_cache"]["peak_kv_bytes"] == 0 and s["no_cache"]["positions_run"] > s["cache"]["positions_run"]
    )
    assert s["cache"]["peak_kv_bytes"] > s["budget_0.1"]["peak_kv_bytes"]
    # the full cache: 2 layers x (k, v) x 2 rows (CFG) x 155 positions x 128 channels x 4 bytes
    assert s["cache"]["peak_kv_bytes"] == 2 * 2 * 2 * 155 * 128 * 4
    assert (s["code_6"]["forward_passes"], s["code_6"]["forward_passes_small"]) == (6, 1)
    assert s["cache"]["forward_passes"] == 7 and out["small"]["preset"] == "var-tiny-small"
    assert cli_main(["model", "info", "var-d30"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "var" and info["params"] == VAR_PARAMS["var-d30"] and info["num_tokens"] == 680
    with pytest.raises(ValueError, match="--settings"):
        from tokscale.autoregressive.var_bench import parse_settings

        parse_settings("cache,budget")
