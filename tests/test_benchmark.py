"""The benchmark runs end to end (on the tiny model) and reports fewer UNet forwards than the reference."""

import importlib.util
import json
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark.py"


def test_benchmark_reports_time_memory_and_forwards(saved_sd_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("benchmark", BENCHMARK)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    output = tmp_path / "result.json"
    settings = ["--height", "64", "--width", "64", "--num_inference_steps", "12", "--skip_steps", "4", "--pairs", "2"]
    results = benchmark.main(["--model", str(saved_sd_dir), "--device", "cpu", "--output", str(output), *settings])
    assert json.loads(output.read_text()) == results
    assert results["images"] == 2
    assert results["inversion_s"] > 0 and results["denoising_s"] > 0 and results["peak_memory_gib"] > 0
    # Reference: 2 pairs x (4 x 12 + 6 x 8) = 192. Here: inversion 8 steps x 8 rows = 64, denoising below 6 x 8 x 2.
    assert results["reference_unet_sample_forwards"] == 192
    assert results["unet_sample_forwards_inversion"] == 64
    assert results["unet_sample_forwards"] < results["reference_unet_sample_forwards"]
