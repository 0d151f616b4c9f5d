"""Export never deletes what it did not write, a file in the way is a clear error, and a tampered export is
refused when loaded. The toy task's run (tests/core/toy_task.py) is exported through the real command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from cli_run import TOY_SPEC  # noqa: E402
from cli_run import tokscale as cli  # noqa: E402

from tokscale.export import export, state_dict_from, weights_sha256
from tokscale.outputs import MARKER, output_folder
from tokscale.registry import TRAINERS_ENV


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "toy"
    cfg = run_dir.parent / "toy.yaml"
    cfg.write_text(f"run_dir: {run_dir}\ntrain:\n  max_steps: 2\n")
    out = cli("toy", str(cfg), module="tokscale.train")
    assert out.returncode == 0, out.stderr[-2000:]
    return run_dir


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setenv(TRAINERS_ENV, TOY_SPEC)


def test_export_into_a_folder_with_other_files_is_refused_and_they_survive(toy_run, tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "my_notes.txt").write_text("mine")
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    r = cli("export", str(toy_run), str(out))
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("tokscale: error:")]
    assert len(errors) == 1 and "my_notes.txt" in errors[0] and "sub/data.bin" in errors[0]
    assert "--overwrite" in errors[0] and "Traceback" not in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["my_notes.txt", "sub"]
    assert (out / "my_notes.txt").read_text() == "mine" and (
        out / "sub" / "data.bin"
    ).read_bytes() == b"\x00\x01"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary left behind


def test_overwrite_writes_the_export_beside_the_other_files_and_deletes_none(toy_run, tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "my_notes.txt").write_text("mine")
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    r = cli("export", str(toy_run), str(out), "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "my_notes.txt").read_text() == "mine" and (out / "sub" / "data.bin").is_file()
    assert weights_sha256(out) and state_dict_from(out, verify_export=True)["weight"].shape == (1, 4)
    assert cli("export", str(toy_run), str(out), "--overwrite").returncode == 0  # again: still kept
    assert (out / "my_notes.txt").read_text() == "mine"


def test_a_previous_export_is_replaced_whole(toy_run, tmp_path, registered):
    out = tmp_path / "out"
    export(toy_run, out)
    (out / "README.md").write_text("edited")
    export(toy_run, out)
    assert (out / "README.md").read_text() != "edited"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([MARKER, "README.md", "SHA256SUMS", "config.yaml", "metrics.json", "model.safetensors",
                            "training.json"])  # fmt: skip
    assert sorted(json.loads((out / MARKER).read_text())["files"]) == sorted(n for n in names if n != MARKER)


def test_a_file_in_the_way_is_a_clear_error(toy_run, tmp_path):
    target = tmp_path / "export"
    target.write_text("not a folder")
    r = cli("export", str(toy_run), str(target))
    assert r.returncode == 2 and "is a file, not a folder" in r.stderr and "Traceback" not in r.stderr
    assert target.read_text() == "not a folder"


def test_a_failure_while_writing_leaves_the_target_as_it_was(tmp_path):
    out = tmp_path / "out"
    with output_folder(out, "thing") as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError, match="boom"), output_folder(out, "thing") as tmp:
        (tmp / "a.txt").write_text("2")
        raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_export_whose_weights_changed_is_refused_when_loaded_unless_told_not_to_check(
    toy_run, tmp_path, registered
):
    out = export(toy_run, tmp_path / "export")
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the tensor data: still loads as safetensors
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors: sha256 differs from SHA256SUMS"):
        state_dict_from(out, verify_export=True)
    assert state_dict_from(out, verify_export=False)["weight"].shape == (1, 4)
