import json

from tokscale.jobs.status import format_status, run_status


def test_status_reads_step_checkpoint_and_job_from_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.setattr("tokscale.jobs.status.slurm_state", lambda job_id: f"STATE-OF-{job_id}")
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "job.json").write_text(json.dumps({"job_id": "17", "stdout": "o", "stderr": "e"}))
    (tmp_path / "config.yaml").write_text("train:\n  max_steps: 100\n")
    for step, complete in ((20, True), (40, True), (60, False)):  # step 60 was cut mid-save
        d = tmp_path / "ckpt" / f"step_{step:08d}"
        d.mkdir(parents=True)
        if complete:
            (d / "COMPLETE").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text('{"step": 50}\n{"step": 55}\n{"ste')  # last line cut by a kill
    s = run_status(tmp_path)
    assert (s["job_id"], s["state"], s["step"], s["max_steps"], s["checkpoint_step"]) == (
        "17",
        "STATE-OF-17",
        55,
        100,
        40,
    )
    text = format_status(s)
    assert "17 (STATE-OF-17)" in text and "55/100" in text and "step_00000040" in text


def test_a_run_never_submitted_says_so(tmp_path):
    s = run_status(tmp_path)
    assert s["state"] == "NOT SUBMITTED" and s["step"] is None and s["checkpoint"] is None
