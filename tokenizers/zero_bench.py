"""``tokscale bench zero``: measured per-rank model-state memory under ZeRO stages 0-3 (JSON).

    tokscale bench zero                       # 2d-tiny, 2 CPU ranks over gloo, bf16
    tokscale bench zero --preset 1d-tiny --world-size 2 --stages 0 3

For each stage it starts ``world_size`` real processes, builds the tokenizer inside a DeepSpeed engine (bf16 mixed
precision, torch AdamW), runs one training step, and then counts the bytes of every live tensor storage in the
process (deduplicated by storage), after the backward pass and after the step (the larger counts), beyond what existed before the model was built: parameters, gradients,
fp32 master weights, Adam moments and DeepSpeed's buffers. Next to it, the ZeRO paper's prediction for
mixed-precision Adam with Psi parameters and N ranks: stage 0 16 Psi, stage 1 4 Psi + 12 Psi / N,
stage 2 2 Psi + 14 Psi / N, stage 3 16 Psi / N bytes.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
from pathlib import Path

import torch

PREDICTED_BYTES_PER_PARAM = {
    0: lambda n: 16.0,
    1: lambda n: 4 + 12 / n,
    2: lambda n: 2 + 14 / n,
    3: lambda n: 16 / n,
}


def live_tensor_bytes() -> int:
    """Bytes of all distinct tensor storages reachable by the garbage collector in this process."""
    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
                st = obj.untyped_storage()
                seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        except (RuntimeError, ReferenceError):  # storages of freed or non-materialised tensors
            continue
    return sum(seen.values())


def _worker(rank: int, world_size: int, port: int, stage: int, preset: str, image_size: int, out_dir: str):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import logging

    import deepspeed

    from tokscale.distributed import init_distributed
    from tokscale.tokenizers.model import VQTokenizer
    from tokscale.tokenizers.presets import preset_config

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    d = init_distributed()
    torch.manual_seed(0)
    base = live_tensor_bytes()
    cfg = preset_config(preset, [f"image_size={image_size}"])
    model = VQTokenizer(cfg, with_projector=False)
    psi = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    bucket = max(psi // 16, 2) // 2 * 2
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": stage,
            # buckets sized well below the model (even, as ZeRO requires) so they do not dominate the measurement
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
            "stage3_prefetch_bucket_size": bucket,
            "stage3_max_live_parameters": bucket,
            "stage3_param_persistence_threshold": 0,
        },
        "bf16": {"enabled": True},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    del model, opt
    x = torch.rand(1, 3, image_size, image_size, device=d.device).to(torch.bfloat16) * 2 - 1
    out = engine(x)
    loss = out["recon"].float().pow(2).mean() + out["loss_commit"] + out["loss_codebook"]
    engine.backward(loss)
    del x, out, loss
    after_backward = live_tensor_bytes() - base  # gradients are live here (freed or flattened after the step)
    engine.step()
    state_bytes = max(after_backward, live_tensor_bytes() - base)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"bytes": state_bytes, "params": psi}))
    from tokscale.shutdown import finish

    finish(0)  # barrier, then os._exit: gloo's threads can abort interpreter teardown (tokscale.shutdown)


def measure(stage: int, preset: str, world_size: int, image_size: int) -> dict:
    import torch.multiprocessing as mp

    from tokscale.distributed import free_port

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(
            _worker,
            args=(world_size, free_port(), stage, preset, image_size, tmp),
            nprocs=world_size,
            join=True,
        )
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world_size)]
    psi = ranks[0]["params"]
    per_rank = [r["bytes"] for r in ranks]
    return {
        "stage": stage,
        "params": psi,
        "measured_bytes_per_rank": per_rank,
        "measured_mb_per_rank": max(per_rank) / 2**20,
        "measured_bytes_per_param": max(per_rank) / psi,
        "predicted_bytes_per_param": PREDICTED_BYTES_PER_PARAM[stage](world_size),
        "predicted_mb_per_rank": PREDICTED_BYTES_PER_PARAM[stage](world_size) * psi / 2**20,
    }


def bench_zero(preset: str, world_size: int, stages: list[int], image_size: int) -> dict:
    rows = [measure(s, preset, world_size, image_size) for s in stages]
    result = {
        "benchmark": "zero_model_state_memory",
        "preset": preset,
        "world_size": world_size,
        "precision": "bf16 mixed, fp32 AdamW states",
        "device": "cuda" if torch.cuda.is_available() else "cpu (gloo)",
        "stages": rows,
    }
    by_stage = {r["stage"]: r for r in rows}
    if 0 in by_stage and 3 in by_stage:
        result["stage3_over_stage0"] = (
            by_stage[3]["measured_mb_per_rank"] / by_stage[0]["measured_mb_per_rank"]
        )
    return result
