"""DetailFlow tokenizer: resolution schedule, group-causal encoder mask, prefix decoding at the scheduled size,
training mode, configs and three-stream extraction, at tiny size (1d-tiny, 64 px, 32 tokens = 4 groups of 8)."""

import pytest
import torch

from tokscale.tokenizers.detailflow import (
    admissible_lengths,
    decoder_size,
    degrade,
    draw_plan,
    group_causal_mask,
    noise_span,
    resolution,
    resolution_schedule,
)
from tokscale.tokenizers.model import VQTokenizer
from tokscale.tokenizers.presets import preset_config
from tokscale.tokenizers.transformer import token_mask

# DetailFlow's schedule (H = 256, p = 1.5, patch 16) as published: t -> (R(t), decoder size)
REFERENCE_SCHEDULE = {
    128: {
        1: (1, 16),
        8: (21, 32),
        16: (44, 48),
        32: (88, 96),
        48: (128, 128),
        64: (164, 176),
        96: (223, 224),
        128: (256, 256),
    },
    256: {8: (11, 16), 32: (46, 48), 64: (89, 96), 128: (165, 176), 192: (223, 224)},
    512: {64: (46, 48), 128: (89, 96), 256: (165, 176), 384: (224, 224)},
}

TINY = [
    "image_size=64",
    "num_tokens=32",
    "token_mask=block_causal",
    "causal_prefix=8",
    "group_size=8",
    "detailflow.enabled=true",
    "detailflow.global_loss_weight=0",
    "encoder.depth=2",
    "decoder.depth=2",
]


def tiny_model(*extra: str) -> VQTokenizer:
    torch.manual_seed(0)
    return VQTokenizer(preset_config("1d-tiny", [*TINY, *extra]), with_projector=False).eval()


@pytest.mark.parametrize("n", sorted(REFERENCE_SCHEDULE))
def test_resolution_schedule_equals_the_published_table(n):
    schedule = resolution_schedule(n, size=256, power=1.5, patch=16, group=8)
    for t, (r, size) in REFERENCE_SCHEDULE[n].items():
        assert schedule[t] == (r, size), t
        assert resolution(t, n) == r and decoder_size(t, n) == size


def test_schedule_is_monotone_bounded_and_full_at_n():
    for n in (128, 256, 512):
        sched = resolution_schedule(n)
        sizes = [sched[t][1] for t in sorted(sched)]
        assert sizes == sorted(sizes) and all(16 <= s <= 256 and s % 16 == 0 for s in sizes)
        assert sched[n] == (256, 256) and sched[1][0] == 1


def test_admissible_lengths_are_the_first_group_then_multiples_of_the_group():
    assert admissible_lengths(32, 8) == [1, 2, 3, 4, 5, 6, 7, 8, 16, 24, 32]
    with pytest.raises(ValueError, match="prefix length"):
        resolution(0, 128)


def test_group_causal_mask_first_group_causal_then_bidirectional_blocks_without_look_ahead():
    n, g = 32, 8
    m = group_causal_mask(n, g)
    assert torch.equal(m, token_mask("block_causal", n, g, g))
    gid = [i if i < g else g + (i - g) // g for i in range(n)]
    for i in range(n):
        for j in range(n):
            later_group = j >= g and j // g > i // g
            if later_group:
                assert not m[i, j], (i, j)  # no token attends to a later group
        assert m[i, : i + 1].all()  # everything before and itself
    for i in range(g):  # first group: token by token
        assert m[i, : i + 1].all() and not m[i, i + 1 : g].any()
    for i in range(g, n):  # later groups: the whole own group, both directions
        start = i - i % g
        assert m[i, start : start + g].all()
    assert len(set(gid)) == g + (n - g) // g


def test_changing_later_encoder_queries_leaves_earlier_groups_outputs_unchanged():
    model = tiny_model()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    feat = model.cnn_features(images)
    mask = model._mask(32, feat.device)
    x = model.encoder.embed(model.encoder.ln_pre(feat.flatten(2).transpose(1, 2)))
    from tokscale.tokenizers.model import multilevel_pool

    grid = x.transpose(1, 2).reshape(2, -1, 4, 4)
    q = model.encoder.global_proj(multilevel_pool(grid, 32))
    with torch.no_grad():
        base = model.encoder(feat, mask, queries=q)
        torch.testing.assert_close(base, model.encoder(feat, mask))  # the default queries are the pooled ones
        for g in (0, 1, 2):  # perturb groups g+1.. : outputs of groups <= g stay
            end = 8 * (g + 1)
            q2 = q.clone()
            q2[:, end:] += torch.randn_like(q2[:, end:])
            out = model.encoder(feat, mask, queries=q2)
            torch.testing.assert_close(out[:, :end], base[:, :end], rtol=0, atol=1e-5)
            assert (out[:, end:] - base[:, end:]).abs().max() > 1e-3
        q3 = q.clone()  # inside the first group: token 3 changes tokens 3.. only
        q3[:, 3] += torch.randn_like(q3[:, 3])
        out = model.encoder(feat, mask, queries=q3)
        torch.testing.assert_close(out[:, :3], base[:, :3], rtol=0, atol=1e-5)
        assert (out[:, 3] - base[:, 3]).abs().max() > 1e-3


def test_every_encoder_query_sees_the_whole_image_through_cross_attention():
    model = tiny_model()
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        feat = model.cnn_features(images)
        base = model.encoder(feat, model._mask(32, feat.device))
        feat2 = feat.clone()
        feat2[..., -1, -1] += 3 * torch.randn_like(feat2[..., -1, -1])  # the bottom-right patch only
        out = model.encoder(feat2, model._mask(32, feat.device))
    # the first token (and every other) depends on the changed patch: latents see all patches
    assert ((out - base).abs().amax(-1) > 1e-4).all()


@pytest.mark.parametrize("t", [1, 5, 8, 16, 24, 32])
def test_decoding_a_prefix_renders_it_at_the_scheduled_size(t):
    model = tiny_model()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    codes = model.encode(images)
    out = model.decode(codes[:, :t])
    size = decoder_size(t, 32, size=64, power=1.5, patch=16)
    assert out.shape == (2, 3, size, size)
    assert torch.isfinite(out).all()


def test_full_prefix_decodes_at_full_size_and_a_plain_1d_tokenizer_is_unchanged():
    model = tiny_model()
    codes = model.encode(torch.zeros(1, 3, 64, 64))
    assert model.decode(codes).shape == (1, 3, 64, 64)
    torch.manual_seed(0)
    plain = VQTokenizer(preset_config("1d-tiny", ["image_size=64", "num_tokens=32"]), with_projector=False)
    assert plain.detailflow is None
    assert plain.decode(plain.encode(torch.zeros(1, 3, 64, 64))[:, :5]).shape == (1, 3, 64, 64)


def test_degraded_target_is_area_down_then_bicubic_up():
    images = torch.rand(2, 3, 64, 64)
    out = degrade(images, 21, 32)
    assert out.shape == (2, 3, 32, 32)
    down = torch.nn.functional.interpolate(images, size=(21, 21), mode="area")
    up = torch.nn.functional.interpolate(down, size=(32, 32), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out, up)
    assert torch.equal(degrade(images, 64, 64), images)


def test_noise_span_is_one_token_in_the_first_group_else_a_whole_earlier_group():
    rng = torch.Generator().manual_seed(0)
    assert noise_span(1, 8, rng) is None
    for _ in range(500):
        t = [2, 5, 8, 16, 24, 32][int(torch.randint(6, (), generator=rng))]
        s, e = noise_span(t, 8, rng)
        if s < 8:
            assert e == s + 1 and s < t
        else:
            assert s % 8 == 0 and e == s + 8 and e <= t - 8 + 8 and s < t - 8


def test_plans_degrade_with_the_configured_probability_at_admissible_prefixes():
    cfg = preset_config("1d-tiny", TINY)
    rng = torch.Generator().manual_seed(1)
    plans = [draw_plan(cfg, rng) for _ in range(2000)]
    degraded = [p for p in plans if p.t < 32]
    assert 0.15 < len(degraded) / len(plans) < 0.25
    assert {p.t for p in degraded} <= set(admissible_lengths(32, 8)) - {32}
    assert all(p.size == decoder_size(p.t, 32, 64) and p.grid == p.size // 16 for p in plans)
    assert all(p.noise is not None for p in plans if p.t > 1)


def test_detailflow_needs_the_group_causal_mask_and_a_1d_tokenizer():
    with pytest.raises(ValueError, match="token_mask=block_causal"):
        preset_config("1d-tiny", ["image_size=64", "num_tokens=32", "detailflow.enabled=true"])
    with pytest.raises(ValueError, match="1D tokenizer"):
        preset_config("2d-tiny", ["detailflow.enabled=true"])
    with pytest.raises(ValueError, match="detailflow.top_k"):
        preset_config("1d-tiny", [*TINY, "detailflow.top_k=0"])


# ----------------------------------------------------------------------------------------------------------------
# training mode


def df_cfg(run_dir, shards, teacher, *extra):
    from tokscale.tokenizers.train import load_train_config

    return load_train_config(
        "tokenizer/detailflow-tiny",
        [
            f"run_dir={run_dir}",
            f"data.train_shards={shards}",
            f"data.eval_shards={shards}",
            "data.batch_size=2",
            "data.num_workers=0",
            "data.shuffle_buffer=8",
            "data.batches_per_epoch=4",
            "model.encoder.depth=1",
            "model.decoder.depth=1",
            "model.semantic_dim=192",
            "model.detailflow.degradation_prob=0.5",
            "model.detailflow.global_loss_weight=1.0",
            "model.detailflow.global_hidden=32",
            f"loss.semantic.teacher_weights={teacher}",
            "loss.semantic.teacher_arch=vit_tiny_patch16_224",
            "loss.semantic.teacher_size=32",
            "loss.semantic.teacher_dim=192",
            "train.max_steps=4",
            "train.log_every=1",
            "train.ckpt_every=4",
            "train.image_every=2",
            "train.progress=false",
            "optim.warmup_steps=1",
            "eval.every_steps=0",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A random-weight timm ViT-Ti/16 at 32 px standing in for the frozen teacher (5.5M parameters)."""
    import timm

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "vit_tiny.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0).state_dict(), path)
    return path


def _rows(run_dir):
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def df_run(tmp_path_factory, image_shards, tiny_teacher):
    from tokscale.tokenizers.train import main

    run_dir = tmp_path_factory.mktemp("df") / "run"
    assert main(df_cfg(run_dir, image_shards, tiny_teacher))["status"] == "done"
    return run_dir


def test_a_few_detailflow_steps_log_finite_detailflow_losses(df_run):
    rows = [r for r in _rows(df_run) if "train/loss_total" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        for key in ("loss_rec", "loss_commit", "loss_codebook", "loss_global", "loss_total"):
            assert torch.isfinite(torch.tensor(r[f"train/{key}"])), key
        assert -1.0 <= r["train/loss_global"] <= 1.0
        assert r["train/detailflow_prefix"] in admissible_lengths(32, 8)
        assert r["train/detailflow_size"] == decoder_size(int(r["train/detailflow_prefix"]), 32, 64)
    assert (df_run / "reconstruction.png").stat().st_size > 0


def test_a_fixed_seed_detailflow_run_is_deterministic(df_run, tmp_path, image_shards, tiny_teacher):
    from tokscale.tokenizers.train import main

    main(df_cfg(tmp_path / "again", image_shards, tiny_teacher))
    keep = ("train/loss_total", "train/loss_global", "train/detailflow_prefix")
    a = [{k: r[k] for k in keep} for r in _rows(df_run) if "train/loss_total" in r]
    b = [{k: r[k] for k in keep} for r in _rows(tmp_path / "again") if "train/loss_total" in r]
    assert a == b


def test_a_degraded_corrected_step_decodes_a_doubled_batch_at_the_prefix_size():
    from tokscale.tokenizers.detailflow import StepPlan, forward_train, plan_target

    model = tiny_model(
        "detailflow.global_loss_weight=1.0", "semantic_dim=16", "detailflow.global_hidden=8"
    ).train()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    plan = StepPlan(t=16, resolution=40, size=48, grid=3, noise=(8, 16))
    out = forward_train(model, images, plan)
    assert out["recon"].shape == (4, 3, 48, 48) and out["global"].shape == (2, 16)
    assert plan_target(images, plan).shape == (4, 3, 48, 48)
    loss = out["recon"].square().mean() + out["loss_commit"] + out["global"].sum()
    loss.backward()
    heads = model.detailflow
    assert heads.refine_proj.weight.grad.abs().sum() > 0 and heads.refine_queries.grad[16:].abs().sum() > 0
    assert heads.refine_queries.grad[:16].abs().sum() == 0  # the corrected prefix replaces those queries


def test_detailflow_training_settings_that_do_not_apply_are_rejected(image_shards, tiny_teacher, tmp_path):
    from tokscale.config import ConfigError

    with pytest.raises(ValueError, match="loss.semantic.weight"):
        df_cfg(
            tmp_path, image_shards, tiny_teacher, "loss.semantic.weight=0.5", "loss.semantic.decoder_layer=1"
        )
    with pytest.raises(ValueError, match="teacher_weights"):
        df_cfg(tmp_path, image_shards, "", "loss.semantic.teacher_weights=")
    with pytest.raises(ValueError, match="semantic_dim"):
        df_cfg(tmp_path, image_shards, tiny_teacher, "model.semantic_dim=64")
    with pytest.raises(ConfigError, match="detailflow.bogus"):
        df_cfg(tmp_path, image_shards, tiny_teacher, "model.detailflow.bogus=1")


def test_the_gan_sees_degraded_prefixes_upsampled_to_the_image_size(tmp_path, image_shards, tiny_teacher):
    from tokscale.tokenizers.train import main

    run_dir = tmp_path / "gan"
    cfg = df_cfg(
        run_dir,
        image_shards,
        tiny_teacher,
        "model.detailflow.degradation_prob=1.0",
        "model.detailflow.global_loss_weight=0",
        "loss.gan.weight=0.5",
        "loss.gan.start_step=1",
        "loss.gan.ndf=16",
        "train.max_steps=3",
    )
    main(cfg)
    rows = [r for r in _rows(run_dir) if "train/loss_total" in r]
    assert all(r["train/detailflow_prefix"] < 32 for r in rows)
    assert all(abs(r["train/loss_gan_g"]) < 1e6 and abs(r["train/loss_gan_d"]) < 1e6 for r in rows)


# ----------------------------------------------------------------------------------------------------------------
# extraction


@pytest.fixture(scope="module")
def df_export(tmp_path_factory):
    """A randomly initialised detailflow tokenizer (64 px, 32 tokens) in the export format."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    model = tiny_model("encoder.depth=1", "decoder.depth=1", "quantizer.codebook_size=256")
    out = tmp_path_factory.mktemp("dfexport") / "df-tiny"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    cfg = OmegaConf.to_container(OmegaConf.structured(model.config))
    OmegaConf.save(OmegaConf.create({"model": cfg}), out / "config.yaml")
    return out


def test_extraction_stores_clean_input_and_label_streams_per_image(df_export, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from tokscale.data.tokens import load_tokens
    from tokscale.tokenizers.detailflow import encode_streams
    from tokscale.tokenizers.extract import _key_seed
    from tokscale.tokenizers.load import load_tokenizer

    out = tmp_path / "tokens"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    res = subprocess.run(
        [sys.executable, "-m", "tokscale.cli", "extract", str(df_export), "--data", "embedded", "--split", "eval",
         str(out), "--aug", "center_flip", "--batch-size", "64"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["streams"] == ["clean", "input", "label"] and manifest["stream_tokens"] == 32
    assert manifest["num_tokens"] == 96 and manifest["num_augs"] == 2
    data = load_tokens(str(out / "*.tar"))
    tokens = data["tokens"].reshape(-1, 2, 3, 32)  # (images, crops, streams, tokens)
    assert tokens.shape[0] == 200
    model = load_tokenizer(df_export)
    codes = model.quantizer.codes()
    for key, image in zip(data["keys"], tokens):
        clean, inp, label = image.unbind(1)  # each (crops, 32)
        s, e = noise_span(32, 8, torch.Generator().manual_seed(_key_seed(key)))  # one span for both crops
        assert e - s == (1 if s < 8 else 8)
        assert torch.equal(inp[:, :s], clean[:, :s]) and torch.equal(label[:, :e], clean[:, :e])
        assert torch.equal(inp[:, e:], label[:, e:])  # the re-encoded tail
        near = torch.cdist(codes[clean[:, s:e].flatten()], codes).topk(50, largest=False).indices
        assert (near == inp[:, s:e].reshape(-1, 1)).any(1).all()  # corrupted codes: top-50 neighbours
    # the stored codes equal a direct encoding of the crops with the images' key seeds, whatever the batch
    from tokscale.data.locations import resolve_shards
    from tokscale.data.samples import decode_image, iter_raw_samples
    from tokscale.data.transforms import to_tensor
    from tokscale.tokenizers.extract import crops

    rows = []
    for sample in iter_raw_samples(resolve_shards("embedded", "eval")[0]):
        x = torch.stack([to_tensor(c.copy()) for c in crops(decode_image(sample), 64, "center_flip")])
        rows.append((data["keys"].index(sample.key), x, _key_seed(sample.key)))
        if len(rows) == 3:
            break
    x = torch.cat([r[1] for r in rows])
    got = encode_streams(model, x, [r[2] for r in rows for _ in range(2)]).reshape(3, 2, 3, 32)
    assert torch.equal(got, tokens[[r[0] for r in rows]])
    assert torch.equal(got[:, :, 0], model.encode(x).reshape(3, 2, 32))


def test_gan_view_upsamples_only_detailflow_prefixes_below_the_image_size(
    image_shards, tiny_teacher, tmp_path
):
    from tokscale.tokenizers.detailflow import gan_view

    cfg = df_cfg(tmp_path, image_shards, tiny_teacher)
    assert gan_view(torch.rand(2, 3, 16, 16), cfg).shape == (2, 3, 64, 64)
    full = torch.rand(2, 3, 64, 64)
    assert gan_view(full, cfg) is full
