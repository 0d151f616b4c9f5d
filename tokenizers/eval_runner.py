"""Evaluation jobs (recon, stats, probe, prefixes) that run the same way in one process, N local processes or on Slurm.

    python -m tokscale.tokenizers.eval_runner EVAL.yaml [OVERRIDES...]   # what every rank runs
    tokscale eval recon runs/tok --data /data/in1k/val --nproc 4          # writes EVAL.yaml, launches it
    tokscale eval recon runs/tok --data /data/in1k/val --submit --gpus-per-node 8   # the same as a Slurm job

Each rank reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (tokscale.distributed), takes its share of the
evaluation stream and merges running sums at the end; rank 0 writes the outputs into ``run_dir``:
``metrics.json``, TensorBoard scalars under ``tb/`` (plus ``metrics.jsonl``) and ``grid.png`` (originals above
reconstructions). With ``out`` set (``tokscale eval recon|probe --out DIR`` sets it, with ``run_dir`` the work
folder ``DIR.eval-job`` holding the config, the logs and a Slurm job's files), the finished files move into
``out`` at the end through :func:`tokscale.outputs.output_folder`: ``out`` appears whole or not at all, a previous
output of the same command is replaced, and a folder with other files is refused before anything runs (kept
with ``overwrite``). The module is a runnable (tokscale.registry): ``load_config`` and ``main(cfg, should_stop)``,
which the Slurm job of tokscale.jobs runs, so submission reuses it unchanged.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from tokscale.data.stream import DataConfig
from tokscale.evaluation.config import EvalConfig
from tokscale.evaluation.probe import ProbeConfig
from tokscale.jsonio import strict_dumps

log = logging.getLogger(__name__)

TASKS = ("recon", "stats", "probe", "prefixes")
PROBE_METHODS = ("lars", "logistic", "both")
CONFIG_NAME = "eval_config.yaml"


@dataclass
class EvalJobConfig:
    task: str = "recon"
    run_dir: str = "eval"  # outputs (and Slurm logs when submitted)
    tokenizer: str = ""  # a run directory (newest checkpoint) or an exported tokenizer
    stats_out: str = ""  # task=stats: the npz to write
    probe_train_shards: str = ""  # task=probe: the probe's training images (data.eval_shards: its test set)
    probe_method: str = "both"  # lars (the MAE protocol) | logistic (quick) | both
    num_classes: int = 0  # 0: the largest label seen + 1
    save_features: bool = False  # task=probe: also write run_dir/features.pt (all ranks' features, for reuse)
    verify_weights: bool = True  # check an exported tokenizer against its SHA256SUMS before loading it
    # task=prefixes: the prefix lengths to decode ([]: the admissible powers of two and N; tokenizers.prefix_eval)
    prefix_lengths: list[int] = field(default_factory=list)
    out: str = (
        ""  # recon/probe: the finished folder (run_dir is then only the work folder); "": run_dir itself
    )
    overwrite: bool = False  # write into an `out` that holds files of something else (they are kept)
    data: DataConfig = field(default_factory=lambda: DataConfig(crop="adm_center", hflip=False))
    eval: EvalConfig = field(default_factory=EvalConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}: expected one of {TASKS}")
        if self.probe_method not in PROBE_METHODS:
            raise ValueError(f"probe_method={self.probe_method!r}: expected one of {PROBE_METHODS}")
        if self.task in ("recon", "probe", "prefixes") and not self.tokenizer:
            raise ValueError(f"task={self.task} needs tokenizer=RUN_DIR_OR_EXPORT")
        if not self.data.eval_shards:
            raise ValueError("data.eval_shards is empty: expected the evaluation shards (or 'embedded')")
        if self.task == "stats" and not self.stats_out:
            raise ValueError("task=stats needs stats_out=OUT.npz")
        if self.task == "probe" and not self.probe_train_shards:
            raise ValueError("task=probe needs probe_train_shards=SHARDS (the probe's training images)")


def load_config(path, overrides=()) -> EvalJobConfig:
    """The job's config (the runnable interface that tokscale.jobs' Slurm job calls)."""
    from tokscale.config import load_config

    return load_config(EvalJobConfig, path, list(overrides))


def write_config(cfg: EvalJobConfig) -> Path:
    from tokscale.config import to_yaml

    out = Path(cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_NAME
    path.write_text(to_yaml(cfg))
    return path


def _stream_cfg(cfg: EvalJobConfig, shards: str | None = None) -> DataConfig:
    return replace(cfg.data, eval_shards=shards or cfg.data.eval_shards, batch_size=cfg.eval.batch_size)


def _checkpoint_step(path: str) -> int:
    from tokscale.checkpoint import latest_checkpoint

    found = latest_checkpoint(path) if Path(path).is_dir() else None
    return found[0] if found else 0


def _load_tokenizer(cfg: EvalJobConfig, device):
    from tokscale.tokenizers.load import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer, device=device, verify=cfg.verify_weights)
    if tok.image_size != cfg.data.resolution:
        raise ValueError(
            f"data.resolution={cfg.data.resolution} but the tokenizer {cfg.tokenizer} works at "
            f"{tok.image_size}px; evaluate at the tokenizer's resolution"
        )
    return tok


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(strict_dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def run_recon(cfg: EvalJobConfig, rank: int, world: int, device) -> dict:
    from tokscale.data.stream import EvalStream
    from tokscale.export import weights_sha256
    from tokscale.logger import MetricLogger
    from tokscale.tokenizers.recon_eval import ReconEvaluator

    tok = _load_tokenizer(cfg, device)
    lpips_module = None
    if cfg.eval.compute_lpips:
        from tokscale.tokenizers.perceptual import VGG_WEIGHTS_SOURCE, PerceptualConfig, build_lpips

        if not cfg.eval.lpips_vgg_weights:
            raise ValueError(
                "eval.lpips_vgg_weights is empty: LPIPS needs a local VGG16 state dict ("
                + VGG_WEIGHTS_SOURCE
                + "); pass --vgg-weights PATH, or eval.compute_lpips=false to skip LPIPS"
            )

        lpips_module = build_lpips(PerceptualConfig(weight=1.0, vgg_weights=cfg.eval.lpips_vgg_weights)).to(
            device
        )
    evaluator = ReconEvaluator(cfg.eval, device, lpips_module)
    stream = EvalStream(_stream_cfg(cfg), rank, world, max_samples=cfg.eval.num_samples)
    start = time.time()
    result = evaluator.run(tok, stream, rank, world, progress=True)
    metrics = result.metrics
    if rank == 0:
        out = Path(cfg.run_dir)
        step = _checkpoint_step(cfg.tokenizer)
        logger = MetricLogger(out, enabled=True)
        # An undefined metric (None, with a *_undefined_reason string beside it) has no scalar to plot.
        logger.scalars(
            step, {f"eval/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        )
        if result.grid is not None:
            logger.image(step, "eval/reconstructions", result.grid)
            from tokscale.images import save_png

            save_png(result.grid, out / "grid.png")
        logger.close()
        _write_json(
            out / "metrics.json",
            {
                "metrics": metrics,
                "tokenizer": str(cfg.tokenizer),
                "weights_sha256": weights_sha256(cfg.tokenizer),  # None for a run directory
                "weights_verified": bool(cfg.verify_weights and weights_sha256(cfg.tokenizer)),
                "step": step,
                "data": cfg.data.eval_shards,
                "reference": cfg.eval.reference_stats or "same evaluation crops",
                "protocol": result.meta.protocol() if result.meta else None,
                "world_size": world,
                "seconds": round(time.time() - start, 1),
            },
        )
        log.info("metrics written to %s", out / "metrics.json")
    return metrics


def run_stats(cfg: EvalJobConfig, rank: int, world: int, device) -> dict:
    from tokscale.data.stream import EvalStream
    from tokscale.evaluation.fid import StatsMeta, dataset_stats, save_stats, warn_if_few_samples
    from tokscale.evaluation.inception import load_inception

    inception = load_inception(cfg.eval.inception_weights, device)
    stream = EvalStream(_stream_cfg(cfg), rank, world, max_samples=cfg.eval.num_samples)
    stats, resolution = dataset_stats(stream, inception, device, progress=rank == 0, total=len(stream))
    n = stats.num_samples
    warn_if_few_samples(n, "reference statistics")
    meta = StatsMeta(resolution=resolution, count=n)
    if rank == 0:
        mu, sigma = stats.mean_cov()
        path = save_stats(cfg.stats_out, mu, sigma, meta)
        log.info("reference statistics of %d images written to %s", n, path)
    return {"count": n, "resolution": resolution, "out": str(cfg.stats_out)}


def tokenizer_features(tok):
    """The tokenizer's probe features: its ``encode_features`` (mean-pooled encoder output) when it has one,
    else the mean of its codes' codebook vectors."""
    if hasattr(tok, "encode_features"):
        return tok.encode_features

    def from_codes(images):
        codes = tok.encode(images)
        return tok.quantizer.lookup(codes).float().mean(1)

    return from_codes


def run_probe(cfg: EvalJobConfig, rank: int, world: int, device) -> dict:
    import torch

    from tokscale.data.stream import EvalStream
    from tokscale.evaluation.probe import (
        extract_features,
        gather_features,
        logistic_probe,
        train_probe_on_features,
    )

    tok = _load_tokenizer(cfg, device)
    fn = tokenizer_features(tok)
    with torch.no_grad():
        train_shards = cfg.probe_train_shards
        if (
            train_shards.strip() == "embedded"
        ):  # EvalStream reads the eval split of "embedded"; name the train one
            from tokscale.data.stream import resolve_shards

            train_shards = "::".join(resolve_shards("embedded", "train", cfg.data.cache_dir))
        train_stream = EvalStream(_stream_cfg(cfg, train_shards), rank, world)
        val_stream = EvalStream(_stream_cfg(cfg), rank, world, max_samples=cfg.eval.num_samples)
        shape = (3, tok.image_size, tok.image_size)
        train = extract_features(fn, train_stream, device, progress=rank == 0, image_shape=shape)
        val = extract_features(fn, val_stream, device, progress=rank == 0, image_shape=shape)
    num_classes = cfg.num_classes
    if num_classes == 0:
        top = torch.tensor([int(train.labels.max()) if train.labels.numel() else 0], device=device)
        if torch.distributed.is_initialized() and world > 1:
            torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX)
        num_classes = int(top.item()) + 1
    results: dict = {"num_classes": num_classes, "features": getattr(fn, "__name__", "features")}
    if (
        cfg.save_features
    ):  # FeatureSets as plain tensors: logistic_probe(FeatureSet(...), ...) reruns in seconds
        all_train, all_val = gather_features(train), gather_features(val)
        if rank == 0:
            path = Path(cfg.run_dir) / "features.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {"train_features": all_train.features, "train_labels": all_train.labels,
                 "eval_features": all_val.features, "eval_labels": all_val.labels, "num_classes": num_classes},
                path,
            )  # fmt: skip
            log.info("probe features written to %s", path)
    if cfg.probe_method in ("lars", "both"):
        results["linear_probe"] = train_probe_on_features(
            train, val, num_classes, cfg.probe, device, progress=True
        )
    if cfg.probe_method in ("logistic", "both"):
        all_train, all_val = gather_features(train), gather_features(val)
        if rank == 0:
            results["logistic_probe"] = logistic_probe(all_train, all_val, num_classes)
    if rank == 0:
        _write_json(Path(cfg.run_dir) / "probe.json", {"tokenizer": str(cfg.tokenizer), **results})
    return results


WORK_SUFFIX = ".eval-job"
KEEP_IN_WORK = ("logs", "slurm")  # a failure's traceback and a Slurm job's files stay with the work folder


def output_kind(task: str) -> str:
    return f"eval-{task}"


def check_out(cfg: EvalJobConfig) -> None:
    """Before anything runs: refuse an ``out`` that is a file or holds files of something else."""
    if cfg.out and cfg.task != "stats":
        from tokscale.outputs import check_target

        check_target(Path(cfg.out), output_kind(cfg.task), cfg.overwrite)


def main(cfg: EvalJobConfig, should_stop=None) -> dict:
    """Run the job on this rank; evaluation is short and restartable, so a stop request is not polled."""
    from tokscale.distributed import barrier, init_distributed

    info = init_distributed()
    check_out(cfg)
    if cfg.task == "prefixes":
        from tokscale.tokenizers.prefix_eval import run_prefixes as run
    else:
        run = {"recon": run_recon, "stats": run_stats, "probe": run_probe}[cfg.task]
    result = run(cfg, info.rank, info.world_size, info.device)
    barrier()
    if info.rank == 0 and cfg.out and cfg.task != "stats":
        from tokscale.outputs import publish_folder

        publish_folder(
            cfg.run_dir, cfg.out, output_kind(cfg.task), cfg.overwrite, KEEP_IN_WORK, (CONFIG_NAME,)
        )
    return {"status": "finished", "task": cfg.task, "result": result}


if __name__ == "__main__":  # python -m tokscale.tokenizers.eval_runner EVAL.yaml [OVERRIDES...]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tokscale.shutdown import finish

    main(load_config(sys.argv[1], sys.argv[2:]))
    finish(0)
