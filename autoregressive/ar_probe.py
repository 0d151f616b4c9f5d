"""GigaTok's AR linear probe as a job: a frozen GPT's mid-depth features of its tokenizer's codes, one rank or many.

    python -m tokscale.autoregressive.ar_probe OUT/ar_probe_config.yaml          # what every rank runs
    tokscale eval ar-probe runs/c2i --tokenizer runs/tok --train-data /data/in1k/train \\
        --eval-data /data/in1k/val --out eval/ar-probe --nproc 8                 # writes the config, launches

The protocol (GigaTok's ``autoregressive/lin_probe/lin_probe.py`` and its composite scripts):

- features: the images' codes ``z`` (tokenizer encode), the teacher-forced sequence ``[null class] + z[:-1]``
  (the null class, index ``num_classes``, for every image: unconditional features), the hidden state after
  block ``depth // 2`` (block index depth // 2 - 1, before the final norm; ``layer`` overrides), averaged over
  every position, the class position included -> (B, width);
- probe: BatchNorm1d(width, affine=False, eps=1e-6) + Linear (head ~ trunc_normal std 0.01, bias 0), LARS
  (momentum 0.9, no weight decay), lr = 0.1 x global batch / 256 with 10 linear warmup epochs then a half cosine
  to 0, per step, 90 epochs (tokscale.evaluation.probe);
- augmentation: training images get ADM's ``random_crop_arr`` (short side to a uniform integer in
  [res, 1.25 res], a random square: ``data.crop=random_resize``, ``data.crop_ratio=1.25``) and a horizontal flip;
  validation images the ADM centre crop; top-1 (and top-5) on the validation set after the last epoch.

Choices, where GigaTok's script leaves room or a reproduction needs one:

- **Online features (default, ``views=0``)**: an augmented image's features change every epoch, so every epoch
  encodes and runs the GPT over the whole training set again, as GigaTok does. ``views=K`` computes K augmented
  views once and trains epoch e on view e mod K (cheaper, K x memory; not the protocol). Without augmentation
  (``data.crop=adm_center data.hflip=false``) one view is computed, whatever ``views`` says. A view's crop and
  flip are seeded by (``data.seed``, view, the decoded image's pixels), so they do not depend on the rank count,
  the loader workers or the batch; identical images get identical crops.
- **GPT in eval mode (default)**: deterministic, dropout-free features. GigaTok never calls ``gpt.eval()``
  while the probe trains, so its training features carry the GPT's dropout (token, residual, FFN: 0.1) while
  its test features do not; ``gpt_train_mode=true`` (``--gpt-train-mode``) reproduces that quirk for the
  training features (validation features stay in eval mode). The tokenizer is always in eval mode.
- **One probe whatever the rank count**: the probe's global batch is ``probe.batch_size`` (per rank, GigaTok's
  LIN_BSZ = 128 per GPU) x world size; each step's global batch comes from one permutation of all sample indices
  seeded by (``probe.seed``, epoch), and the BatchNorm statistics are those of the global batch (synchronised
  across ranks) where GigaTok's are each GPU's 128 samples. So N ranks with ``batch_size`` B/N train the probe
  that one process with B trains (up to the order of floating-point sums), and the evaluation, which uses the
  running statistics, is the same either way. Dropout in ``gpt_train_mode`` is the exception: its masks come
  from each rank's generator.
- **Resumable at epoch granularity**: after every epoch rank 0 writes ``ar_probe_state.pt`` (probe, optimizer,
  epoch); a rerun with the same settings (a requeued Slurm job, a killed local run) continues after that epoch
  with the same result, except for ``gpt_train_mode``'s dropout masks. A stop request is acted on after the
  current epoch.
- ``precision``: fp32 (default) or bf16/fp16 autocast for the tokenizer + GPT forward (GigaTok: fp16).

Outputs in ``run_dir`` (rank 0): ``metrics.json`` (strict JSON: top1, top5, sample counts, layer, feature
width, epochs, lr, batches, augmentation, GPT mode, paths, world size, ...), ``probe.pt`` (the trained probe's
state dict), ``ar_probe_config.yaml`` (the resolved config; written before launch by ``tokscale eval ar-probe``).
"""

from __future__ import annotations

import logging
import random
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from tokscale.data.stream import DataConfig
from tokscale.data.transforms import ImageTransform
from tokscale.evaluation.probe import ProbeConfig
from tokscale.jsonio import strict_dumps

log = logging.getLogger(__name__)

CONFIG_NAME = "ar_probe_config.yaml"
STATE_NAME = "ar_probe_state.pt"
OUTPUT_KIND = "eval-ar-probe"
WORK_SUFFIX = ".ar-probe-job"
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ArProbeConfig:
    gpt: str = ""  # a `tokscale train c2i` run directory or a GPT export
    tokenizer: str = ""  # the tokenizer whose codes the GPT was trained on
    run_dir: str = (
        "eval/ar-probe"  # outputs (and Slurm logs when submitted); the work folder when `out` is set
    )
    out: str = ""  # the finished folder (`tokscale eval ar-probe --out`); "": run_dir itself
    layer: int = 0  # features after this block (1-based); 0: depth // 2 (GigaTok)
    views: int = 0  # 0: fresh augmented features every epoch (the protocol); K: K views computed once, cycled
    gpt_train_mode: bool = False  # True: GigaTok's quirk, the GPT's dropout active on the training features
    num_classes: int = 0  # the probe's classes; 0: the largest label seen + 1
    num_train: int = 0  # 0: every training image; N: the first N (a quick run)
    num_val: int = 0  # 0: every validation image; N: the first N
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast of the tokenizer + GPT forward
    device: str = "auto"  # auto (the rank's GPU, else the CPU) | cpu | cuda
    verify_weights: bool = True  # check exports against their SHA256SUMS before loading
    overwrite: bool = False  # replace a finished run_dir's results, or an unfinished one with other settings
    progress: bool = True
    # data.train_shards / data.eval_shards: the probe's training and validation images; data.batch_size: images
    # per rank per forward; data.crop / crop_ratio / hflip: the training augmentation (validation: ADM centre).
    data: DataConfig = field(
        default_factory=lambda: DataConfig(crop="random_resize", crop_ratio=1.25, hflip=True, batch_size=128)
    )
    probe: ProbeConfig = field(default_factory=lambda: ProbeConfig(batch_size=128))

    def __post_init__(self):
        for key in ("gpt", "tokenizer"):
            if not getattr(self, key):
                raise ValueError(f"{key} is empty: expected a path")
        if not self.data.train_shards or not self.data.eval_shards:
            raise ValueError(
                "data.train_shards and data.eval_shards must both be set (the probe's training and "
                "validation images: paths, patterns, or 'embedded')"
            )
        for key in ("layer", "views", "num_classes", "num_train", "num_val"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)}: expected >= 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: expected one of {list(PRECISIONS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: expected auto, cpu or cuda")

    @property
    def augmented(self) -> bool:
        return self.data.crop != "adm_center" or self.data.hflip


def load_config(path, overrides=()) -> ArProbeConfig:
    """The job's config (the runnable interface that tokscale.jobs' Slurm job calls)."""
    from tokscale.config import load_config as load

    return load(ArProbeConfig, path, list(overrides))


def _settings(cfg: ArProbeConfig) -> dict:
    """What decides the probe (a resume must match it); overwrite, progress and device do not."""
    d = asdict(cfg)
    for key in ("overwrite", "progress", "device", "run_dir"):
        d.pop(key)
    d["data"].pop("num_workers")
    return d


def check_probe_model(path: str) -> None:
    """Refuse a model the probe cannot read: a VAR (``schema: var``) predicts a whole scale per step from the
    previous scales' accumulated features under a block-causal mask, so it has no teacher-forced next-token
    sequence of its codes for ``GPT.features``. c2i, DetailFlow (its group-causal mask) and converted GPTs pass."""
    from tokscale.autoregressive.var_sample import is_var_model

    if is_var_model(path):
        raise ValueError(
            f"{path} is a VAR (a `tokscale train var` run or export, schema: var): `eval ar-probe` probes a "
            "next-token GPT (a `tokscale train c2i` or `detailflow` run, or a GPT export); VAR has no linear probe"
        )


def prepare(cfg: ArProbeConfig) -> Path:
    """Before any process starts: check the model (a GPT, not a VAR) and the GPT/tokenizer pair, refuse a
    finished or incompatible run_dir (unless ``overwrite``), write the config every rank reads; returns its
    path."""
    from tokscale.autoregressive.sample_job import check_pair
    from tokscale.config import to_yaml

    check_probe_model(cfg.gpt)
    check_pair(cfg.gpt, cfg.tokenizer)
    if cfg.out:  # a folder of other files is refused; a previous ar-probe output is replaced at the end
        from tokscale.outputs import check_target

        check_target(Path(cfg.out), OUTPUT_KIND, cfg.overwrite)
    out = Path(cfg.run_dir)
    state = out / STATE_NAME
    if (out / "metrics.json").is_file() and not cfg.overwrite:
        raise FileExistsError(
            f"{out / 'metrics.json'} exists; choose a new --out (or --overwrite to replace it)"
        )
    if state.is_file():
        old = torch.load(state, map_location="cpu", weights_only=True)["settings"]
        if old != _settings(cfg) and not cfg.overwrite:
            raise ValueError(
                f"{out} holds an unfinished ar-probe with other settings; rerun with its settings "
                f"({out / CONFIG_NAME}) to resume it, or pass --overwrite to start afresh"
            )
        if cfg.overwrite:
            state.unlink()
    if cfg.overwrite:
        for name in ("metrics.json", "probe.pt"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_NAME
    path.write_text(to_yaml(replace(cfg, overwrite=False)))  # a requeued job resumes instead of restarting
    return path


def probe_layer(depth: int, layer: int = 0) -> int:
    """The block whose output the probe reads (1-based): ``layer``, or GigaTok's ``depth // 2``."""
    chosen = layer or depth // 2
    if not 1 <= chosen <= depth:
        raise ValueError(f"layer={chosen}: the GPT has blocks 1..{depth}")
    return chosen


def ar_features(gpt, tokenizer, layer: int, precision: str = "fp32"):
    """``images (B, 3, H, W) in [-1, 1] -> (B, width)`` float32: the mean over every position of the hidden state
    after block ``layer`` of the teacher-forced ``[null class] + codes[:-1]``. The GPT's and the tokenizer's
    modes are the caller's (eval: deterministic)."""
    dtype = PRECISIONS[precision]

    def features(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype != torch.float32):
            codes = tokenizer.encode(images).long()
            null = torch.full((codes.shape[0],), gpt.config.null_class, dtype=torch.long, device=codes.device)
            hidden = gpt.features(codes, null, layer)  # (B, T, width): T positions incl. the class position
        return hidden.float().mean(1)

    return features


@dataclass(frozen=True)
class SeededView:
    """A training transform whose randomness is seeded by (seed, view, the decoded image's pixels): the same
    crop for an image whichever rank, loader worker or batch decodes it."""

    transform: ImageTransform
    seed: int
    view: int

    def __call__(self, img, rng=None) -> torch.Tensor:
        digest = zlib.crc32(img.tobytes())
        return self.transform(img, random.Random(f"{self.seed}/{self.view}/{img.size}/{digest}"))


def _train_shards(cfg: ArProbeConfig) -> str:
    if cfg.data.train_shards.strip() == "embedded":  # EvalStream reads the eval split of "embedded"
        from tokscale.data.stream import resolve_shards

        return "::".join(resolve_shards("embedded", "train", cfg.data.cache_dir))
    return cfg.data.train_shards


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def main(cfg: ArProbeConfig, should_stop=None) -> dict:
    """Train the probe on this rank's shares; rank 0 writes the results. Collective."""
    from tokscale.autoregressive.load import load_gpt
    from tokscale.autoregressive.sample_job import check_pair
    from tokscale.data.stream import EvalStream
    from tokscale.distributed import barrier, init_distributed
    from tokscale.evaluation.probe import extract_features, train_probe_online
    from tokscale.export import weights_sha256
    from tokscale.tokenizers.load import load_tokenizer

    start = time.time()
    info = init_distributed()
    rank, world = info.rank, info.world_size
    device = info.device if cfg.device == "auto" else torch.device(cfg.device)
    check_probe_model(cfg.gpt)
    check_pair(cfg.gpt, cfg.tokenizer)
    gpt = load_gpt(cfg.gpt, device, verify=cfg.verify_weights)
    tokenizer = load_tokenizer(cfg.tokenizer, device, verify=cfg.verify_weights).eval()
    if tokenizer.image_size != cfg.data.resolution:
        raise ValueError(
            f"data.resolution={cfg.data.resolution} but the tokenizer {cfg.tokenizer} works at "
            f"{tokenizer.image_size}px; probe at the tokenizer's resolution"
        )
    for p in (*gpt.parameters(), *tokenizer.parameters()):
        p.requires_grad_(False)
    layer = probe_layer(gpt.config.depth, cfg.layer)
    fn = ar_features(gpt, tokenizer, layer, cfg.precision)
    shape = (3, cfg.data.resolution, cfg.data.resolution)

    val_stream = EvalStream(cfg.data, rank, world, max_samples=cfg.num_val or None)
    gpt.eval()
    val = extract_features(fn, val_stream, device, progress=cfg.progress and rank == 0, image_shape=shape)

    train_data = replace(cfg.data, eval_shards=_train_shards(cfg))
    augment = ImageTransform(cfg.data.resolution, cfg.data.crop, cfg.data.crop_ratio, cfg.data.hflip)

    def train_batches(view: int):
        stream = EvalStream(train_data, rank, world, max_samples=cfg.num_train or None)
        if cfg.augmented:
            stream.transform = SeededView(augment, cfg.data.seed, view)
        return stream

    views = cfg.views if cfg.augmented or cfg.gpt_train_mode else 1

    out = Path(cfg.run_dir)
    state_path = out / STATE_NAME
    settings = _settings(cfg)
    global_batch = cfg.probe.batch_size * world
    state = None
    if state_path.is_file():
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
        if saved["settings"] != settings:
            raise ValueError(
                f"{state_path} records an unfinished probe with other settings; remove it or use another run_dir"
            )
        if saved["global_batch"] != global_batch:
            raise ValueError(
                f"{state_path} was trained with a global batch of {saved['global_batch']} "
                f"(probe.batch_size x ranks); now {cfg.probe.batch_size} x {world} = {global_batch}: resume with "
                "the same global batch"
            )
        state = saved["probe"]

    def save_state(probe_state: dict) -> None:
        if rank == 0:
            payload = {"settings": settings, "global_batch": global_batch, "probe": probe_state}
            _write_atomic(state_path, lambda tmp: torch.save(payload, tmp))

    if cfg.gpt_train_mode:
        gpt.train()  # GigaTok's quirk: dropout on; the class is the null class already, class dropout is moot
        torch.manual_seed(cfg.probe.seed * 100_003 + rank)  # this rank's dropout masks
    result = train_probe_online(
        fn,
        train_batches,
        val,
        cfg.num_classes,
        cfg.probe,
        device,
        views=views,
        progress=cfg.progress,
        image_shape=shape,
        samples_per_epoch=len(train_batches(0)),
        state=state,
        save_state=save_state,
        should_stop=should_stop,
    )
    gpt.eval()
    if result["status"] == "stopped":
        log.info("stopped after epoch %d; a rerun resumes from %s", result["epochs_done"], state_path)
        return {"status": "stopped", "epochs_done": result["epochs_done"]}
    probe = result.pop("probe")
    metrics = {
        "top1": result["top1"],
        "top5": result["top5"],
        "num_train": result["num_train"],
        "num_val": result["num_eval"],
        "num_classes": result["num_classes"],
        "layer": layer,  # features after block `layer` (1-based)
        "block_index": layer - 1,  # the same block, 0-based
        "depth": gpt.config.depth,
        "feature_dim": result["feature_dim"],
        "pooling": "mean over all positions, the null-class position included",
        "class_token": f"null class {gpt.config.null_class} for every image",
        "epochs": cfg.probe.epochs,
        "warmup_epochs": cfg.probe.warmup_epochs,
        "lr": result["lr"],
        "base_lr": cfg.probe.base_lr,
        "batch_size_per_rank": cfg.probe.batch_size,
        "global_batch": result["global_batch"],
        "steps_per_epoch": result["steps_per_epoch"],
        "optimizer": "LARS (momentum 0.9, trust 0.001, no weight decay on <= 1-d parameters)",
        "weight_decay": cfg.probe.weight_decay,
        "probe_seed": cfg.probe.seed,
        "augmentation": {
            "train": {"crop": cfg.data.crop, "crop_ratio": cfg.data.crop_ratio, "hflip": cfg.data.hflip}
            if cfg.augmented
            else {"crop": "adm_center", "hflip": False},
            "val": {"crop": "adm_center", "hflip": False},
            "resolution": cfg.data.resolution,
            "features": "online (every epoch)" if views == 0 else f"{views} precomputed view(s), cycled",
            "seed": cfg.data.seed,
        },
        "gpt_mode": "train (dropout on training features)" if cfg.gpt_train_mode else "eval",
        "precision": cfg.precision,
        "gpt": str(cfg.gpt),
        "gpt_weights_sha256": weights_sha256(cfg.gpt),  # None for a run directory
        "tokenizer": str(cfg.tokenizer),
        "tokenizer_weights_sha256": weights_sha256(cfg.tokenizer),
        "train_data": cfg.data.train_shards,
        "eval_data": cfg.data.eval_shards,
        "world_size": world,
        "seconds": round(time.time() - start, 1),
    }
    if rank == 0:
        _write_atomic(out / "probe.pt", lambda tmp: torch.save(probe.state_dict(), tmp))
        _write_atomic(
            out / "metrics.json", lambda tmp: tmp.write_text(strict_dumps(metrics, indent=2) + "\n")
        )
        state_path.unlink(missing_ok=True)
        if cfg.out:
            from tokscale.outputs import publish_folder

            publish_folder(out, cfg.out, OUTPUT_KIND, cfg.overwrite, copy=(CONFIG_NAME,))
        log.info(
            "AR probe top-1 %.2f%% written to %s", metrics["top1"], Path(cfg.out or out) / "metrics.json"
        )
    barrier()
    return {"status": "finished", "result": metrics}


if __name__ == "__main__":  # python -m tokscale.autoregressive.ar_probe CONFIG.yaml [OVERRIDES...]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tokscale.shutdown import finish

    main(load_config(sys.argv[1], sys.argv[2:]))
    finish(0)
