"""Export a run to publishable weights, and publish them.

    tokscale export runs/demo exports/2d-tiny-demo
    tokscale publish exports/2d-tiny-demo my-org/tokscale-2d-tiny-demo

The export folder holds ``model.safetensors`` (fp32, consolidated from any ZeRO stage), ``config.yaml`` (the
run's resolved config), ``training.json`` (step, data, world size, git commit), ``metrics.json`` (evaluation
results when the run has them), ``README.md`` (a Hugging Face model card) and ``SHA256SUMS`` over all of them.
It is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from omegaconf import OmegaConf

from tokscale.checkpoint import latest_checkpoint
from tokscale.tokenizers.load import CONFIG, WEIGHTS, consolidated_state_dict

MANIFEST = "SHA256SUMS"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run_info(run_dir: Path) -> dict:
    lines = (
        (run_dir / "run_info.jsonl").read_text().splitlines() if (run_dir / "run_info.jsonl").exists() else []
    )
    return json.loads(lines[-1]) if lines else {}


def _eval_metrics(run_dir: Path) -> dict:
    """The newest ``tokscale eval recon`` result under the run dir (eval/**/metrics.json), if any."""
    eval_dir = run_dir / "eval"
    files = (
        sorted(eval_dir.rglob("metrics.json"), key=lambda p: p.stat().st_mtime) if eval_dir.is_dir() else []
    )
    if not files:
        return {}
    result = json.loads(files[-1].read_text())
    return result.get("metrics", result)


def model_card(cfg, training: dict, metrics: dict, params: int) -> str:
    m = cfg["model"]
    rows = "\n".join(
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()
    )
    metric_block = (
        f"| metric | value |\n|---|---|\n{rows}"
        if metrics
        else "No evaluation metrics were recorded for this run."
    )
    return f"""---
library_name: tokscale
tags:
- image-tokenizer
- vector-quantization
- autoregressive-image-generation
pipeline_tag: image-to-image
---

# tokscale {m["kind"].upper()} tokenizer{f" ({m['preset']})" if m.get("preset") else ""}

A GigaTok-style hybrid CNN + transformer VQ tokenizer trained with tokscale.

- Tokens per image: {m["num_tokens"] if m["kind"] == "1d" else (m["image_size"] // 16) ** 2}, image size {m["image_size"]}
- Codebook: {m["quantizer"]["codebook_size"]} codes of dimension {m["quantizer"]["code_dim"]} (l2-normalised: {m["quantizer"]["l2_norm"]})
- Encoder: width {m["encoder"]["width"]}, depth {m["encoder"]["depth"]}; decoder: width {m["decoder"]["width"]}, depth {m["decoder"]["depth"]}
- Parameters: {params:,}

## Training

- Steps: {training.get("step")}; world size: {training.get("world_size")}; ZeRO stage: {cfg["train"]["zero_stage"]}
- Data: `{cfg["data"]["train_shards"]}` at {cfg["data"]["resolution"]} px
- Code: tokscale commit `{training.get("git_commit")}`

## Evaluation

{metric_block}

## Use

```python
import tokscale
tok = tokscale.load_tokenizer("path/to/this/folder")
codes = tok.encode(images)   # images in [-1, 1], (B, 3, H, W)
recon = tok.decode(codes)
```
"""


def export(run_dir: str | Path, out: str | Path) -> Path:
    from safetensors.torch import save_file

    run_dir, out = Path(run_dir), Path(out)
    found = latest_checkpoint(run_dir)
    if found is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint under ckpt/ to export")
    step, ckpt = found
    state = consolidated_state_dict(ckpt)
    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / CONFIG), resolve=True)
    info = json.loads((ckpt / "COMPLETE").read_text())
    training = {
        "step": step,
        "world_size": info["world_size"],
        "git_commit": _run_info(run_dir).get("git_commit", "unknown"),
        "data": cfg["data"]["train_shards"],
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_run": str(run_dir.resolve()),
    }
    metrics = _eval_metrics(run_dir)
    params = sum(v.numel() for v in state.values())

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
    (tmp / CONFIG).write_text(OmegaConf.to_yaml(cfg))
    (tmp / "training.json").write_text(json.dumps(training, indent=2))
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (tmp / "README.md").write_text(model_card(cfg, training, metrics, params))
    sums = [f"{sha256(p)}  {p.name}" for p in sorted(tmp.iterdir())]
    (tmp / MANIFEST).write_text("\n".join(sums) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


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
