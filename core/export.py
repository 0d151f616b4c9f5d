"""Export any trainer's run to publishable weights, load them back, and publish them.

    tokscale export runs/demo exports/2d-tiny-demo
    tokscale publish exports/2d-tiny-demo my-org/tokscale-2d-tiny-demo

The export folder holds ``model.safetensors`` (fp32, consolidated from any ZeRO stage), ``config.yaml`` (the
run's resolved config, led by ``schema: TRAINER``), ``training.json`` (trainer, step, data, world size, git
commit), ``metrics.json`` (the newest evaluation results under the run, when it has them), ``README.md`` (a
Hugging Face model card written by the trainer's ``model_card`` hook) and ``SHA256SUMS`` over all of them. It is
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tokscale.checkpoint import consolidated_state_dict, latest_checkpoint
from tokscale.jsonio import strict_dumps

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
TRAINING = "training.json"
MANIFEST = "SHA256SUMS"
DEFAULT_TRAINER = "tokenizer"  # runs written before configs recorded their schema came from this trainer


class ConversionError(ValueError):
    """Another project's checkpoint that a ``tokscale convert`` command cannot turn into an export."""


def check_keys_fit(where: str, describes: str, unknown: list[str], missing: list[str]) -> None:
    """A converted state dict must fill the model exactly: name the reference keys nothing takes and the tokscale
    keys nothing filled."""
    if unknown or missing:
        raise ConversionError(
            f"{where}: the state dict does not fit the model its {describes} describe"
            + ("s" if describes == "config" else "")
            + ": "
            + (f"unexpected keys {unknown}" if unknown else "")
            + ("; " if unknown and missing else "")
            + (f"missing tokscale keys {missing}" if missing else "")
        )


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_export(path: Path) -> bool:
    return (Path(path) / WEIGHTS).is_file() and (Path(path) / CONFIG).is_file()


def read_config(path: str | Path) -> dict:
    """The resolved config of a run directory or export (``config.yaml``), as a plain dict."""
    cfg_file = Path(path) / CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: expected a tokscale run directory or export")
    return OmegaConf.to_container(OmegaConf.load(cfg_file), resolve=True)


def trainer_name(cfg: dict, where: str | Path = "") -> str:
    name = cfg.get("schema")
    if name:
        return str(name)
    log.warning("%s has no 'schema' key; taking it for a %r run", where or "config", DEFAULT_TRAINER)
    return DEFAULT_TRAINER


def weights_sha256(folder: str | Path) -> str | None:
    """The sha256 of an export's weights as its SHA256SUMS records it (None for a run directory)."""
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        return None
    for line in manifest.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if name.strip() == WEIGHTS:
            return digest
    return None


def state_dict_from(path: str | Path, verify_export: bool = False) -> dict[str, torch.Tensor]:
    """Weights of an export, or of a run directory's newest complete checkpoint (consolidated to fp32).
    ``verify_export``: check an export's files against its SHA256SUMS first (the command line does by default)."""
    path = Path(path)
    if is_export(path):
        from safetensors.torch import load_file

        if verify_export and (path / MANIFEST).is_file():
            verify(path)
        elif verify_export:
            log.warning("%s has no %s: its files cannot be checked", path, MANIFEST)

        return load_file(str(path / WEIGHTS))
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(
            f"{path}: neither an export ({WEIGHTS} + {CONFIG}) nor a run directory with a complete checkpoint "
            "under ckpt/"
        )
    return consolidated_state_dict(found[1])


def _run_info(run_dir: Path) -> dict:
    path = run_dir / "run_info.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else {}


def eval_metrics(run_dir: Path) -> dict:
    """The newest evaluation result under the run dir (eval/**/metrics.json), if any."""
    eval_dir = run_dir / "eval"
    files = (
        sorted(eval_dir.rglob("metrics.json"), key=lambda p: p.stat().st_mtime) if eval_dir.is_dir() else []
    )
    if not files:
        return {}
    result = json.loads(files[-1].read_text())
    return result.get("metrics", result)


def metrics_table(metrics: dict) -> str:
    if not metrics:
        return "No evaluation metrics were recorded for this run."
    rows = "\n".join(
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()
    )
    return f"| metric | value |\n|---|---|\n{rows}"


def generic_model_card(trainer: str, cfg: dict, training: dict, metrics: dict, params: int) -> str:
    return f"""---
library_name: tokscale
---

# tokscale {trainer} model

- Parameters: {params:,}
- Steps: {training.get("step")}; world size: {training.get("world_size")}
- Code: tokscale commit `{training.get("git_commit")}`

## Evaluation

{metrics_table(metrics)}
"""


def ema_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The moving average of the weights that a task saves as its side state ``ema`` (name -> tensor, the
    model's own keys), from a checkpoint's trainer.pt."""
    side = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False).get("ema")
    if not isinstance(side, dict) or not side:
        raise ValueError(
            f"{ckpt}: no EMA of the weights in trainer.pt (train with an EMA, e.g. c2i's ema_decay=0.9999, "
            "or export the weights themselves)"
        )
    return side


def export(run_dir: str | Path, out: str | Path, overwrite: bool = False, weights: str = "model") -> Path:
    """Consolidate the newest complete checkpoint of any registered trainer's run into ``out``. A previous export
    there is replaced; a folder with other files is refused unless ``overwrite`` (which keeps those files).
    ``weights="ema"`` exports the run's moving average of the weights (its side state ``ema``) instead."""

    from tokscale.outputs import check_target, output_folder
    from tokscale.registry import trainer

    run_dir, out = Path(run_dir), Path(out)
    check_target(out, "export", overwrite)  # before the (slow) consolidation
    found = latest_checkpoint(run_dir)
    if found is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint under ckpt/ to export")
    step, ckpt = found
    cfg = read_config(run_dir)
    name = trainer_name(cfg, run_dir / CONFIG)
    task_cls = trainer(name)
    if weights not in ("model", "ema"):
        raise ValueError(f"weights={weights!r}: expected 'model' or 'ema'")
    if weights == "ema":
        state = ema_state_dict(ckpt)
        missing = sorted(set(consolidated_state_dict(ckpt)) - set(state))
        if missing:
            raise ValueError(
                f"{ckpt}: the EMA lacks weights {missing[:5]}{' ...' if len(missing) > 5 else ''}"
            )
    else:
        state = consolidated_state_dict(ckpt)
    info = json.loads((ckpt / "COMPLETE").read_text())
    training = {
        "trainer": name,
        "step": step,
        "world_size": info["world_size"],
        "git_commit": _run_info(run_dir).get("git_commit", "unknown"),
        "data": (cfg.get("data") or {}).get("train_shards"),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_run": str(run_dir.resolve()),
        "weights": weights,
    }
    metrics = eval_metrics(run_dir)
    params = sum(v.numel() for v in state.values())

    with output_folder(out, "export", overwrite) as tmp:
        write_export(
            tmp, state, cfg, name, training, metrics, task_cls.model_card(cfg, training, metrics, params)
        )
    return out


def write_export(
    tmp: Path, state: dict, cfg: dict, name: str, training: dict, metrics: dict, card: str
) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
    (tmp / CONFIG).write_text(
        OmegaConf.to_yaml({"schema": name, **{k: v for k, v in cfg.items() if k != "schema"}})
    )
    (tmp / TRAINING).write_text(json.dumps(training, indent=2))
    (tmp / "metrics.json").write_text(strict_dumps(metrics, indent=2))
    (tmp / "README.md").write_text(card)
    sums = [f"{sha256(p)}  {p.name}" for p in sorted(tmp.iterdir())]
    (tmp / MANIFEST).write_text("\n".join(sums) + "\n")


def verify(folder: str | Path) -> None:
    """Check every file against SHA256SUMS; raise naming the first mismatch."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: not a tokscale export (run `tokscale export` first)")
    for line in manifest.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is listed in {MANIFEST} but missing")
        if sha256(folder / name) != digest:
            raise ValueError(
                f"{folder / name}: sha256 differs from {MANIFEST}; the export is corrupt or was edited"
            )


def publish(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload an export folder to the Hugging Face Hub; says what is missing when it cannot."""
    verify(folder)
    try:
        from huggingface_hub import HfApi, get_token
    except ImportError as err:
        raise ValueError("publishing needs huggingface_hub: pip install 'tokscale[publish]'") from err
    if not get_token():
        raise ValueError(
            "no Hugging Face credentials: run `huggingface-cli login` or set HF_TOKEN to a token with write access, "
            f"then rerun `tokscale publish {folder} {repo_id}`"
        )
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model")
    return str(getattr(info, "commit_url", info))
