"""One rank of the two-process data test (run by tests/data/test_distributed.py, not collected by pytest).

python tests/data/distributed_worker.py RANK WORLD_SIZE INIT_FILE SHARDS OUT_JSON
"""

from __future__ import annotations

import datetime
import json
import sys

import torch
import torch.distributed as dist

from tokscale.data.stream import DataConfig, EvalStream, TrainStream
from tokscale.shutdown import finish


def main() -> None:
    rank, world_size, init_file, shards, out = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6]
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    cfg = DataConfig(
        train_shards=shards,
        eval_shards=shards,
        resolution=8,
        batch_size=3,
        num_workers=2,
        shuffle_buffer=4,
        batches_per_epoch=4,
    )
    eval_stream = EvalStream(cfg, rank, world_size)
    eval_keys = [k for _, _, keys, _ in eval_stream for k in keys]

    # Two epochs of training with a collective every step, as a trainer does: a rank that ran out early
    # would leave its peer blocked in all_reduce until the timeout.
    stream = TrainStream(cfg, rank, world_size)
    steps = 0
    train_labels = []
    for images, labels in stream:
        total = torch.tensor([images.shape[0]], dtype=torch.int64)
        dist.all_reduce(total)
        train_labels.append(labels.tolist())
        steps += 1
        if stream.epoch == 2:
            break
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, eval_keys)
    with open(out, "w") as f:
        json.dump(
            {
                "eval_keys": eval_keys,
                "eval_len": len(eval_stream),
                "all_eval_keys": gathered,
                "train_steps": steps,
                "train_labels": train_labels,
                "state": stream.state_dict(),
            },
            f,
        )
    # gloo's threads can abort interpreter teardown (SIGABRT) even after destroy_process_group: leave as every
    # tokscale entry point does (tokscale.shutdown)
    finish(0)


if __name__ == "__main__":
    main()
