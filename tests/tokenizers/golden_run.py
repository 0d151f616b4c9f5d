"""The fixed-seed tokenizer run whose logged losses tests/tokenizers/golden_losses.json records.

Every loss term of the trainer is on: L2, commitment/codebook, entropy, LPIPS (random VGG16 trunk), the
semantic loss against a random DINOv2 ViT-S/14 teacher, GigaTok's auxiliary shortcut and feature losses at steps
1-2, and the PatchGAN with DiffAug from step 3 (so the discriminator step, its optimizer on the generator's
schedule and the augmentation RNG are exercised). CPU, fp32, one rank.

    python tests/tokenizers/golden_run.py RUN_DIR SHARDS OUT.json     # re-record (only after a deliberate change)

Every process of the run (the weights too) runs under PINNED_ENV: one thread, ATen's scalar kernels, oneDNN's
SSE4.1 code path and MKL's cross-CPU reproducible mode. With the machine's own AVX-512 / AVX2 kernels, two Xeons
differed by 1.5e-4 in the first gradient norm and Adam's first steps amplified that to 5% by step 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

GOLDEN = Path(__file__).with_name("golden_losses.json")
PINNED_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ATEN_CPU_CAPABILITY": "default",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "MKL_CBWR": "COMPATIBLE",
}


def pinned_env() -> dict[str, str]:
    return {**os.environ, **PINNED_ENV}


def write_weights_pinned(folder: Path) -> tuple[Path, Path]:
    """write_weights in a process under PINNED_ENV (torch's vectorised normal_ differs between CPU kernels)."""
    subprocess.run(
        [sys.executable, __file__, "weights", str(folder)], env=pinned_env(), check=True, timeout=300
    )
    return folder / "vgg16.pth", folder / "dinov2_vits14.pth"


def write_weights(folder: Path) -> tuple[Path, Path]:
    """Deterministic random stand-ins for the VGG16 and DINOv2 files (no download)."""
    import timm
    import torchvision

    folder.mkdir(parents=True, exist_ok=True)
    vgg, dino = folder / "vgg16.pth", folder / "dinov2_vits14.pth"
    torch.manual_seed(0)
    features = torchvision.models.vgg16().features
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, vgg)
    torch.manual_seed(1)
    teacher = timm.create_model("vit_small_patch14_dinov2", img_size=224, num_classes=0)
    torch.save(teacher.state_dict(), dino)
    return vgg, dino


def overrides(run_dir, shards: str, vgg: Path, dino: Path) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"data.train_shards={shards}",
        f"data.eval_shards={shards}",
        "model.image_size=32",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "data.batches_per_epoch=4",
        "train.max_steps=6",
        "train.log_every=1",
        "train.ckpt_every=3",
        "train.image_every=3",
        "train.progress=false",
        "optim.warmup_steps=2",
        # the values the golden losses were recorded with (conf/tokenizer/demo.yaml has since changed them)
        "optim.lr=1e-3",
        "optim.min_lr=1e-4",
        "model.cnn.num_groups=32",
        "eval.every_steps=0",
        "loss.perceptual.weight=1.0",
        f"loss.perceptual.vgg_weights={vgg}",
        "loss.semantic.weight=0.5",
        f"loss.semantic.teacher_weights={dino}",
        "loss.semantic.teacher_arch=vit_small_patch14_dinov2",
        "loss.semantic.teacher_dim=384",
        "model.semantic_dim=384",
        "loss.semantic.decoder_layer=2",
        "loss.gan.weight=0.1",
        "loss.gan.start_step=3",
        "loss.gan.ndf=16",
        "loss.gan.num_layers=2",
        "loss.gan.diff_aug=true",
        "loss.aux.until_step=3",
    ]


def logged_losses(run_dir) -> dict[str, dict[str, float]]:
    """{step: {key: value}} for every train/loss_* and train/grad_norm value in metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    out = {}
    for r in rows:
        vals = {k: v for k, v in r.items() if k.startswith("train/loss_") or k == "train/grad_norm"}
        if vals:
            out[str(r["step"])] = vals
    return out


if __name__ == "__main__":
    if sys.argv[1] == "weights":
        write_weights(Path(sys.argv[2]))
        sys.exit(0)
    if any(os.environ.get(k) != v for k, v in PINNED_ENV.items()):
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], pinned_env())
    run_dir, shards, out = sys.argv[1:]
    vgg, dino = write_weights(Path(run_dir).parent / "weights")
    from tokscale.tokenizers.train import load_train_config, main

    main(load_train_config("tokenizer/demo", overrides(run_dir, shards, vgg, dino)))
    Path(out).write_text(json.dumps(logged_losses(run_dir), indent=1, sort_keys=True) + "\n")
