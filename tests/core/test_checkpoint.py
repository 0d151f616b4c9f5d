"""The base package's checkpoint helpers on their own: atomic rename, pruning, the universal decision and the
world-size change, with a real DeepSpeed engine (one process over gloo)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tokscale.checkpoint import (
    complete_checkpoints,
    consolidated_state_dict,
    latest_checkpoint,
    load_checkpoint,
    needs_universal,
    prune,
    save_checkpoint,
    step_dir,
)


def make_engine(seed: int = 0):
    import deepspeed

    from tokscale.distributed import init_distributed

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_distributed()
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 0},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def take_a_step(engine) -> None:
    loss = engine(torch.ones(1, 3)).pow(2).sum()
    engine.backward(loss)
    engine.step()


def save(engine, run_dir, step, keep_last=3, data=None):
    return save_checkpoint(
        engine,
        run_dir,
        step,
        rank=0,
        world_size=1,
        rank_state={"rng": {"x": 1}, "data": data or {"batches": step}},
        trainer_state={"step": step, "side": {"n": step}},
        keep_last=keep_last,
    )


@pytest.fixture(scope="module")
def engine():
    return make_engine()


def test_a_save_is_renamed_into_place_complete_and_leaves_no_temporary_folder(engine, tmp_path):
    take_a_step(engine)
    path = save(engine, tmp_path, 5)
    assert path == step_dir(tmp_path, 5) and path.name == "step_00000005"
    names = sorted(p.name for p in path.iterdir())
    assert names == [
        "COMPLETE",
        "engine",
        "latest",
        "rank_00000.pt",
        "trainer.pt",
    ]  # latest: DeepSpeed's tag file
    assert json.loads((path / "COMPLETE").read_text()) == {"step": 5, "world_size": 1}
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".tmp_")]
    weights = consolidated_state_dict(path)
    assert all(torch.equal(weights[k], v.float()) for k, v in engine.module.state_dict().items())


def test_only_folders_with_a_complete_marker_count_as_checkpoints(engine, tmp_path):
    save(engine, tmp_path, 2)
    (tmp_path / "ckpt" / ".tmp_step_00000004" / "engine").mkdir(parents=True)  # a crash mid-save
    (tmp_path / "ckpt" / "step_00000006").mkdir()  # no COMPLETE
    assert latest_checkpoint(tmp_path)[0] == 2


def test_pruning_keeps_the_newest_k_complete_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        d = step_dir(tmp_path, step)
        d.mkdir(parents=True)
        (d / "COMPLETE").write_text(json.dumps({"step": step, "world_size": 1}))
    (tmp_path / "ckpt" / "step_00000009").mkdir()  # incomplete: neither kept in the count nor removed
    prune(tmp_path, keep_last=2)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [3, 4]
    assert (tmp_path / "ckpt" / "step_00000009").is_dir()
    prune(tmp_path, keep_last=0)  # 0 keeps everything
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [3, 4]


def test_saving_the_same_step_again_replaces_it(engine, tmp_path):
    save(engine, tmp_path, 3, data={"batches": 1})
    save(engine, tmp_path, 3, data={"batches": 2})
    state = torch.load(step_dir(tmp_path, 3) / "rank_00000.pt", weights_only=False)
    assert state["data"] == {"batches": 2} and [s for s, _ in complete_checkpoints(tmp_path)] == [3]


@pytest.mark.parametrize(
    ("saved_world", "world", "stage", "bf16", "universal"),
    [
        (2, 2, 3, True, False),  # same world size: the engine's own shards load
        (2, 1, 0, False, False),  # plain fp32 data parallel: the state is not partitioned
        (2, 1, 1, False, True),  # ZeRO partitions optimizer state by rank
        (1, 4, 3, False, True),
        (2, 1, 0, True, True),  # the bf16 optimizer partitions its fp32 master weights
    ],
)
def test_the_universal_conversion_is_needed_exactly_when_partitioned_state_meets_another_world_size(
    tmp_path, saved_world, world, stage, bf16, universal
):
    (tmp_path / "COMPLETE").write_text(json.dumps({"step": 1, "world_size": saved_world}))
    assert needs_universal(tmp_path, world, stage, bf16) is universal


def test_loading_restores_engine_and_states_and_on_another_world_size_keeps_only_rank0s_data(tmp_path):
    first = make_engine(seed=0)
    take_a_step(first)
    path = save(first, tmp_path, 7)
    trained = {k: v.clone() for k, v in first.module.state_dict().items()}

    fresh = make_engine(seed=1)
    trainer_state, rank_state = load_checkpoint(fresh, path, rank=0, world_size=1)
    assert trainer_state["step"] == 7 and trainer_state["side"] == {"n": 7}
    assert rank_state == {"rng": {"x": 1}, "data": {"batches": 7}}
    assert all(torch.equal(fresh.module.state_dict()[k], v) for k, v in trained.items())

    # The same checkpoint as if written by two ranks, read by one: RNG streams restart, rank 0's position is kept.
    (path / "COMPLETE").write_text(json.dumps({"step": 7, "world_size": 2}))
    torch.save({"rng": {"x": 2}, "data": {"batches": 7}}, path / "rank_00001.pt")
    _, rank_state = load_checkpoint(make_engine(seed=2), path, rank=0, world_size=1)
    assert rank_state == {"data": {"batches": 7}}
