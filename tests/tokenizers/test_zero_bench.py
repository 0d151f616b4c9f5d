import pytest

from tokscale.tokenizers.zero_bench import bench_zero


@pytest.mark.slow
def test_zero3_holds_at_most_six_tenths_of_stage0_model_state_memory_at_two_ranks():
    result = bench_zero("2d-tiny", world_size=2, stages=[0, 3], image_size=32)
    stage0, stage3 = result["stages"]
    assert result["stage3_over_stage0"] <= 0.6
    # the measurement agrees with the ZeRO paper's bytes-per-parameter prediction
    assert stage0["measured_bytes_per_param"] == pytest.approx(16.0, rel=0.1)
    assert stage3["measured_bytes_per_param"] == pytest.approx(8.0, rel=0.1)
    assert len(stage3["measured_bytes_per_rank"]) == 2
