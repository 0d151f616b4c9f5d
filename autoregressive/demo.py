"""The embedded demo end to end: the tokenizer stage (tokscale.tokenizers.demo), then a class-conditional GPT on
its codes, a sample grid per class, gFID and the AR probe, all on the embedded dataset and a 2-core CPU.

    tokscale demo                                  # into runs/demo (see README.md, "Measured", for the time)
    tokscale demo --run-dir runs/demo2 train.max_steps=100 c2i.train.max_steps=100 ar.gen_samples=50
    tokscale demo --ar-only                        # the AR stages again, on the tokenizer already in runs/demo
    tokscale demo --skip-ar                        # the tokenizer stage alone
    tokscale demo --inception-weights weights-inception-2015-12-05-6726825d.pth   # or TOKSCALE_INCEPTION_WEIGHTS

Overrides: ``KEY=VALUE`` goes to conf/tokenizer/demo.yaml, ``c2i.KEY=VALUE`` to conf/c2i/demo.yaml and
``ar.KEY=VALUE`` to :class:`ArDemoConfig`.

The AR stages call the functions behind `tokscale extract`, `train c2i`, `eval gen` and `eval ar-probe`, in this
process, into RUN (removed and made afresh on every run, so that they always match the tokenizer):

1. ``RUN/tokens/train`` and ``RUN/tokens/eval``: the codes of the embedded train split (ADM centre crop and its
   flip, ``extract_aug``) and of the eval split (centre crop);
2. ``RUN/gpt``: a GPT (conf/c2i/demo.yaml) on the train codes; validation cross-entropy on the eval codes;
3. ``RUN/gen``: ``gen_samples`` samples, the same number per class, scored against the embedded eval images as an
   ADM-format reference (``arr_0`` uint8 (200, H, W, 3) ADM centre crops at the tokenizer's resolution, ``arr_1``
   labels; built once beside the embedded dataset); ``RUN/demo_samples.png`` shows ``grid_per_class`` of them per
   class, one row per class (class 0 on top);
4. ``RUN/ar_probe``: GigaTok's AR probe of the GPT (train split -> eval split), with few epochs.

Everything lands in the ``ar`` section of ``RUN/demo_metrics.json``. gFID needs Inception weights that a fresh
machine does not have and that tokscale never downloads: without ``--inception-weights`` the demo scores with a
randomly initialised Inception (tokscale.evaluation.inception.write_random_inception_weights, seed 0) and says so
in the file. Such a gFID ranks demo runs against each other, nothing more; at 100-200 samples even real weights
give a number far above any published gFID (FID is biased upwards at small N), so the file also holds the FID of
as many real train images against the same reference: the floor at this sample count.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

INCEPTION_ENV = "TOKSCALE_INCEPTION_WEIGHTS"
RANDOM_INCEPTION_SEED = 0
AR_FOLDERS = ("tokens", "gpt", "gen", "gen.gen-job", "ar_probe")
DEMO_SETS = ("run_dir", "data.train_tokens", "data.val_tokens")  # of the GPT's config: the stages' hand-over


@dataclass
class ArDemoConfig:
    extract_aug: str = "center_flip"  # codes per training image: center (1) | center_flip (2) | tencrop (10)
    extract_batch_size: int = 64
    gen_samples: int = 100  # gFID samples, the same number for every class (a multiple of the class count)
    grid_per_class: int = 8  # samples per row of demo_samples.png (at most gen_samples / classes)
    cfg_scale: float = 2.0  # classifier-free guidance of the samples (1 = none)
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    gen_batch_size: int = 50
    reference_per_class: int = 0  # eval images per class in the gFID reference; 0 = all 20 (200 images)
    real_floor: bool = True  # also score gen_samples real train images against the reference (the FID floor)
    probe_epochs: int = 10  # GigaTok: 90
    probe_warmup_epochs: int = 1  # GigaTok: 10
    probe_batch_size: int = 64  # GigaTok: 128 per GPU
    # x batch / 256, as the protocol scales it. The protocol's 0.1 is meant for 90 epochs on ImageNet: in the
    # demo's 150 LARS steps the probe hardly leaves its init (measured top-1: 0.1 12%, 1 48.5%, 3 55%, 10 58.5%,
    # 30 59%)
    probe_base_lr: float = 10.0
    # augmented training views computed once and cycled (the protocol recomputes them every epoch: an encode of
    # the whole train split per epoch)
    probe_views: int = 2
    # torch-fidelity's Inception file; "" = random weights (see the module docstring)
    inception_weights: str = ""
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        from tokscale.tokenizers.extract import AUGS

        if self.extract_aug not in AUGS:
            raise ValueError(f"ar.extract_aug={self.extract_aug!r}: expected one of {sorted(AUGS)}")
        if self.reference_per_class < 0:
            raise ValueError(f"ar.reference_per_class must be >= 0 (0: all), got {self.reference_per_class}")
        for key in ("extract_batch_size", "gen_samples", "grid_per_class", "gen_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"ar.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("probe_epochs", "probe_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"ar.{key} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.probe_warmup_epochs <= self.probe_epochs or self.probe_views < 0:
            raise ValueError(
                f"ar.probe_warmup_epochs={self.probe_warmup_epochs} must be in 0..probe_epochs and "
                f"ar.probe_views={self.probe_views} >= 0"
            )


@dataclass
class DemoOverrides:
    """The command line's dotlist, split by target: the tokenizer stage, the GPT (``c2i.``), the AR stages (``ar.``)."""

    tokenizer: list[str] = field(default_factory=list)
    c2i: list[str] = field(default_factory=list)
    ar: list[str] = field(default_factory=list)

    @classmethod
    def split(cls, overrides) -> DemoOverrides:
        out = cls()
        for item in overrides:
            key = item.split("=", 1)[0]
            if key.startswith("c2i."):
                out.c2i.append(item[len("c2i.") :])
            elif key.startswith("ar."):
                out.ar.append(item[len("ar.") :])
            else:
                out.tokenizer.append(item)
        return out


def load_ar_config(overrides=()) -> ArDemoConfig:
    from tokscale.config import ConfigError, load_config

    try:
        return load_config(ArDemoConfig, None, list(overrides))
    except ConfigError as err:
        raise ConfigError(f"an ar. override (the AR stages' ArDemoConfig): {err}") from None


def run(
    run_dir: str,
    overrides=(),
    *,
    skip_ar: bool = False,
    ar_only: bool = False,
    inception_weights: str = "",
) -> dict:
    """The whole demo (or one half of it); returns what demo_metrics.json holds."""
    from tokscale.jsonio import strict_dumps
    from tokscale.tokenizers.demo import METRICS
    from tokscale.tokenizers.demo import demo as tokenizer_demo

    if skip_ar and ar_only:
        raise ValueError("--skip-ar and --ar-only exclude each other")
    started = time.time()
    parts = DemoOverrides.split(overrides)
    weights = inception_weights or os.environ.get(INCEPTION_ENV, "")
    ar_cfg = load_ar_config(parts.ar + ([f"inception_weights={weights}"] if weights else []))
    if not skip_ar:
        _check_c2i_overrides(parts.c2i)
    out = Path(run_dir)
    if ar_only:
        if parts.tokenizer:
            raise ValueError(
                f"--ar-only trains no tokenizer: its overrides {parts.tokenizer} would not apply"
            )
        metrics_path = out / METRICS
        report = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    else:
        report = tokenizer_demo(run_dir, parts.tokenizer)
    if not skip_ar:
        report["ar"] = ar_stages(out, ar_cfg, parts.c2i)
        report.setdefault("files", {}).update(report["ar"].pop("files"))
    report["total_seconds"] = round(time.time() - started, 1)
    report["total_seconds_covers"] = (
        "the AR stages only (--ar-only)"
        if ar_only
        else "the tokenizer stage only (--skip-ar)"
        if skip_ar
        else "tokenizer stage and AR stages"
    )
    (out / METRICS).write_text(strict_dumps(report, indent=2) + "\n")
    return report


def _check_c2i_overrides(overrides: list[str]) -> None:
    """A typo in a ``c2i.`` override fails before any AR work starts (the paths are filled in later)."""
    from tokscale.autoregressive.train import load_train_config
    from tokscale.config import ConfigError

    fixed = [o for o in overrides if o.split("=", 1)[0] in DEMO_SETS]
    if fixed:
        raise ConfigError(f"{fixed}: the demo sets {list(DEMO_SETS)} of its GPT itself (under --run-dir)")
    try:
        load_train_config("c2i/demo", overrides)
    except ConfigError as err:
        raise ConfigError(f"a c2i. override (conf/c2i/demo.yaml): {err}") from None


def ar_stages(run_dir: Path, cfg: ArDemoConfig, c2i_overrides: list[str]) -> dict:
    """Extraction, GPT, samples + gFID, AR probe on the tokenizer in ``run_dir``; returns the ``ar`` section."""
    from omegaconf import OmegaConf

    from tokscale.tokenizers.load import model_config_from

    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{run_dir / 'config.yaml'} not found: the AR stages need the demo tokenizer there; run `tokscale demo` "
            "without --ar-only first"
        )
    started = time.time()
    tok_cfg = model_config_from(run_dir)
    data = OmegaConf.load(run_dir / "config.yaml").get("data", {})
    cache_dir = str(data.get("cache_dir", "") or "")
    num_workers = int(data.get("num_workers", 1))
    for name in AR_FOLDERS:
        shutil.rmtree(run_dir / name, ignore_errors=True)

    section: dict = {}
    timer = time.time()
    section["tokens"] = extract_tokens(run_dir, cfg, cache_dir)
    section["tokens"]["seconds"] = round(time.time() - timer, 1)

    timer = time.time()
    section["gpt"] = train_gpt(run_dir, cfg, c2i_overrides)
    section["gpt"]["seconds"] = round(time.time() - timer, 1)

    timer = time.time()
    reference = reference_npz(cache_dir, tok_cfg.image_size, cfg.reference_per_class)
    weights, weights_note = inception_weights(cfg, cache_dir)
    gen = score_samples(run_dir, cfg, reference, weights)
    gen["inception_weights"] = weights_note
    if cfg.real_floor:
        gen["real_floor"] = real_floor(
            cfg, reference, weights, cache_dir, tok_cfg.image_size, gen["num_classes"]
        )
    grid = run_dir / "demo_samples.png"
    gen["grid"] = sample_grid(run_dir / "gen" / "samples.npz", grid, cfg.grid_per_class, gen["num_classes"])
    gen["seconds"] = round(time.time() - timer, 1)
    section["gen"] = gen

    timer = time.time()
    section["ar_probe"] = ar_probe(run_dir, cfg, cache_dir, tok_cfg.image_size, num_workers)
    section["ar_probe"]["seconds"] = round(time.time() - timer, 1)
    section["seconds"] = round(time.time() - started, 1)
    section["files"] = {
        "samples": str(grid),
        "gen_results": str(run_dir / "gen" / "results.json"),
        "gpt": str(run_dir / "gpt"),
        "ar_probe": str(run_dir / "ar_probe" / "metrics.json"),
    }
    return section


# ----------------------------------------------------------------------------------------------------------------
# stages


def extract_tokens(run_dir: Path, cfg: ArDemoConfig, cache_dir: str) -> dict:
    from tokscale.data.embedded import embedded_shards
    from tokscale.tokenizers.extract import AUGS, ExtractConfig
    from tokscale.tokenizers.extract import main as extract

    counts = {}
    for split, aug in (("train", cfg.extract_aug), ("eval", "center")):
        result = extract(
            ExtractConfig(
                tokenizer=str(run_dir),
                data=embedded_shards(cache_dir or None, split),
                out=str(run_dir / "tokens" / split),
                aug=aug,
                batch_size=cfg.extract_batch_size,
                progress=cfg.progress,
            )
        )
        counts[split] = result["num_samples"]
    return {
        "train_images": counts["train"],
        "eval_images": counts["eval"],
        "train_augmentation": f"{cfg.extract_aug} ({AUGS[cfg.extract_aug]} crops per image)",
        "eval_augmentation": "center (1 crop per image)",
        "train_tokens": str(run_dir / "tokens" / "train"),
        "eval_tokens": str(run_dir / "tokens" / "eval"),
    }


def unigram_ce(train_tokens: str, val_tokens: str, vocab: int) -> float:
    """Cross-entropy (nats per token) on the validation codes (augmentation 0) of the training codes' frequencies
    (add-one smoothed): what a model that knows only how often each code occurs scores."""
    from tokscale.data.tokens import load_tokens

    train = load_tokens(train_tokens)["tokens"].reshape(-1)
    val = load_tokens(val_tokens)["tokens"][:, 0].reshape(-1)
    counts = torch.bincount(train, minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[val].mean())


def train_gpt(run_dir: Path, cfg: ArDemoConfig, overrides: list[str]) -> dict:
    from tokscale.autoregressive.gpt import GPT, param_counts
    from tokscale.autoregressive.train import load_train_config, main

    tokens = run_dir / "tokens"
    c2i = load_train_config(
        "c2i/demo",
        [
            f"run_dir={run_dir / 'gpt'}",
            f"data.train_tokens={tokens / 'train'}",
            f"data.val_tokens={tokens / 'eval'}",
            f"data.seed={cfg.seed}",
            f"train.progress={cfg.progress}",
            *overrides,
        ],
    )
    timer = time.time()
    result = main(c2i)
    seconds = time.time() - timer
    rows = [json.loads(line) for line in (run_dir / "gpt" / "metrics.jsonl").read_text().splitlines()]
    val = [(r["step"], r["val/loss_ce"]) for r in rows if "val/loss_ce" in r]
    train = [r["train/loss_ce"] for r in rows if "train/loss_ce" in r]
    with torch.device("meta"):
        params = param_counts(GPT(c2i.model))["params"]
    m = c2i.model
    return {
        "preset": m.preset,
        "params": params,
        "width": m.width,
        "depth": m.depth,
        "steps": result["step"],
        "batch_size": c2i.data.batch_size,
        "train_seconds": round(seconds, 1),
        "train_ce_last": train[-1] if train else None,
        "val_ce": {str(step): value for step, value in val},
        "val_ce_end": val[-1][1] if val else None,
        "ln_vocab": math.log(m.vocab_size),
        "unigram_ce": unigram_ce(str(tokens / "train"), str(tokens / "eval"), m.vocab_size),
        "ce_note": "nats per token on the 200 held-out images' codes; ln_vocab: uniform guessing; unigram_ce: "
        "only the training codes' frequencies. Below unigram_ce the GPT uses the class and the preceding codes",
    }


def reference_npz(cache_dir: str, resolution: int, per_class: int = 0) -> Path:
    """The embedded eval split (``per_class`` images of each class; 0: all) as an ADM-format reference at
    ``resolution``, built once beside the dataset (so that its Inception activations are cached there too)."""
    from tokscale.data.embedded import VERSION, embedded_root

    which = f"-{per_class}pc" if per_class else ""
    path = embedded_root(cache_dir or None) / "reference" / f"eval-adm{resolution}{which}-{VERSION}.npz"
    if path.is_file():
        return path
    images, labels = _embedded_uint8(cache_dir, "eval", resolution)
    if per_class:
        pick = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])
        images, labels = images[pick], labels[pick]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, arr_0=images, arr_1=labels)
    os.replace(tmp, path)
    return path


def _embedded_uint8(cache_dir: str, split: str, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Every image of an embedded split, ADM centre crop at ``resolution``, uint8 (N, H, W, 3), and its labels."""
    from tokscale.data.embedded import embedded_shards
    from tokscale.data.stream import DataConfig, EvalStream
    from tokscale.evaluation.inception import quantize_uint8

    data = DataConfig(
        eval_shards=embedded_shards(cache_dir or None, split),
        resolution=resolution,
        num_workers=0,
    )
    images, labels = [], []
    for batch, y, *_ in EvalStream(data, rank=0, world_size=1):
        images.append(quantize_uint8(batch).permute(0, 2, 3, 1))  # exact: the crops came from uint8 pixels
        labels.append(y)
    return torch.cat(images).numpy(), torch.cat(labels).numpy().astype(np.int64)


def inception_weights(cfg: ArDemoConfig, cache_dir: str) -> tuple[str, dict]:
    """(the weights file, what demo_metrics.json says about it): the given file, else random weights (seed 0),
    written once beside the embedded dataset."""
    from tokscale.data.embedded import embedded_root
    from tokscale.evaluation.inception import (
        INCEPTION_FILE,
        check_weights_path,
        write_random_inception_weights,
    )

    if cfg.inception_weights:
        path = check_weights_path(cfg.inception_weights)
        return str(path), {
            "kind": "given",
            "path": str(path.resolve()),
            "note": f"the weights given (torch-fidelity's {INCEPTION_FILE} makes the protocol's features); still "
            "only a handful of samples against a 200-image reference: compare with real_floor, not with papers",
        }
    path = (
        embedded_root(cache_dir or None) / "reference" / f"inception-random-seed{RANDOM_INCEPTION_SEED}.pth"
    )
    if not path.is_file():
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        write_random_inception_weights(tmp, seed=RANDOM_INCEPTION_SEED)
        os.replace(tmp, path)
    return str(path), {
        "kind": "random",
        "path": str(path),
        "seed": RANDOM_INCEPTION_SEED,
        "note": "RANDOMLY INITIALISED Inception weights (no pretrained file on this machine; tokscale never "
        f"downloads one): this gFID only ranks demo runs on this code against each other and is not comparable "
        f"to any published number. Give torch-fidelity's {INCEPTION_FILE} with --inception-weights or "
        f"{INCEPTION_ENV} for the protocol's features",
    }


def score_samples(run_dir: Path, cfg: ArDemoConfig, reference: Path, weights: str) -> dict:
    from tokscale.autoregressive.gen_eval import GenEvalConfig, main, prepare
    from tokscale.autoregressive.load import model_config_from
    from tokscale.autoregressive.sample import SampleConfig

    num_classes = model_config_from(run_dir / "gpt").num_classes
    gen = GenEvalConfig(
        gpt=str(run_dir / "gpt"),
        tokenizer=str(run_dir),
        reference=str(reference),
        out=str(run_dir / "gen"),
        inception_weights=weights,
        num_samples=cfg.gen_samples,
        class_rule="balanced",
        seed=cfg.seed,
        batch_size=cfg.gen_batch_size,
        is_splits=min(10, cfg.gen_samples),
        overwrite=True,
        progress=cfg.progress,
        sample=SampleConfig(cfg_scale=cfg.cfg_scale, temperature=cfg.temperature, top_k=cfg.top_k),
    )
    prepare(gen)
    main(gen)
    results = json.loads((run_dir / "gen" / "results.json").read_text())
    return {
        "gfid": results["fid"],
        "num_samples": results["num_samples"],
        "class_rule": "balanced",
        "num_classes": num_classes,
        "is_mean": results["is_mean"],
        "is_std": results["is_std"],
        "precision": results["precision"],
        "recall": results["recall"],
        "sampler": results["sampler"],
        "reference": {
            "path": str(reference),
            "description": f"the embedded eval split: {results['reference']['images_shape'][0]} images (the "
            f"same number per class), ADM centre crop at {results['image_size_eval']} px, uint8 (arr_0, labels in arr_1); FID "
            "statistics from their Inception activations",
            "sha256": results["reference"]["sha256"],
        },
    }


def real_floor(
    cfg: ArDemoConfig, reference: Path, weights: str, cache_dir: str, resolution: int, num_classes: int
) -> dict:
    """FID, precision and recall of ``gen_samples`` real train images (the same number per class) against the
    reference, with the same Inception: what a perfect generator scores at this sample count."""
    from tokscale.evaluation.fid import GaussianStats, frechet_distance
    from tokscale.evaluation.inception import load_inception
    from tokscale.evaluation.precision_recall import precision_recall
    from tokscale.evaluation.reference import reference_activations

    images, labels = _embedded_uint8(cache_dir, "train", resolution)
    per_class = max(1, cfg.gen_samples // num_classes)
    pick = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(num_classes)])
    net = load_inception(weights)
    pools = []
    with torch.inference_mode():
        for chunk in torch.from_numpy(images[pick]).permute(0, 3, 1, 2).split(cfg.gen_batch_size):
            pools.append(net(chunk.contiguous())[0].float())
    pool = torch.cat(pools)
    ref = reference_activations(str(reference), net, "cpu", progress=False)
    stats, ref_stats = GaussianStats(), GaussianStats(ref.shape[1])
    stats.update(pool)
    ref_stats.update(torch.from_numpy(ref))
    (mu, sigma), (mu_ref, sigma_ref) = stats.mean_cov(), ref_stats.mean_cov()
    precision, recall = precision_recall(ref, pool.numpy(), k=3, device="cpu")
    return {
        "fid": frechet_distance(mu, sigma, mu_ref, sigma_ref),
        "num_images": int(len(pick)),
        "precision": precision,
        "recall": recall,
        "what": "real train-split images (the same number per class as the samples) against the same reference "
        "with the same Inception: the best a generator can score here",
    }


def sample_grid(samples_npz: Path, out: Path, per_class: int, num_classes: int) -> dict:
    """``per_class`` samples of every class, one row per class (class 0 on top), from eval gen's ADM npz."""
    from tokscale.images import image_grid, save_png

    with np.load(samples_npz) as z:
        images, labels = z["arr_0"], z["arr_1"]
    rows = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)[:per_class]
        rows.append(torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float() / 255)
    n = min(len(r) for r in rows)
    save_png(image_grid(*rows, n=n, padding=2), out)
    return {
        "path": str(out),
        "rows": num_classes,
        "per_row": n,
        "layout": "one row per class, class 0 on top",
    }


def ar_probe(run_dir: Path, cfg: ArDemoConfig, cache_dir: str, resolution: int, num_workers: int) -> dict:
    from tokscale.autoregressive.ar_probe import ArProbeConfig, main, prepare
    from tokscale.data.stream import DataConfig
    from tokscale.evaluation.probe import ProbeConfig

    probe_cfg = ArProbeConfig(
        gpt=str(run_dir / "gpt"),
        tokenizer=str(run_dir),
        run_dir=str(run_dir / "ar_probe"),
        views=cfg.probe_views,
        overwrite=True,
        progress=cfg.progress,
        data=DataConfig(
            train_shards="embedded",
            eval_shards="embedded",
            resolution=resolution,
            crop="random_resize",
            crop_ratio=1.25,
            hflip=True,
            batch_size=cfg.probe_batch_size,
            num_workers=num_workers,
            seed=cfg.seed,
            cache_dir=cache_dir,
        ),
        probe=ProbeConfig(
            epochs=cfg.probe_epochs,
            warmup_epochs=cfg.probe_warmup_epochs,
            base_lr=cfg.probe_base_lr,
            batch_size=cfg.probe_batch_size,
            seed=cfg.seed,
        ),
    )
    prepare(probe_cfg)
    m = main(probe_cfg)["result"]
    chance = 100.0 / m["num_classes"]
    return {
        "top1": m["top1"],
        "top5": m["top5"],
        "chance_top1": chance,
        "num_classes": m["num_classes"],
        "num_train": m["num_train"],
        "num_val": m["num_val"],
        "layer": m["layer"],
        "depth": m["depth"],
        "epochs": m["epochs"],
        "base_lr": m["base_lr"],
        "lr": m["lr"],
        "features": m["augmentation"]["features"],
        "note": f"top-1 % of a linear probe on the frozen GPT's block {m['layer']} features (null class, mean over "
        f"positions) of the {m['num_val']} held-out images; chance is {chance:g}%. {m['epochs']} epochs on "
        f"{m['num_train']} images at base_lr {m['base_lr']:g}, not GigaTok's 90 on ImageNet at 0.1: it shows that the "
        "features separate the classes, it is not a comparable number",
    }
