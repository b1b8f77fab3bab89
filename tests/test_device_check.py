"""benchmarks/device_check.py at the tiny shape on CPU, as a separate process: every section runs,
the JSON carries the documented fields and the markdown the documented columns."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import device_check  # noqa: E402


def test_device_check_tiny_writes_its_json_and_table(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device, as on a lent GPU
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "device_check.py"), "--shape", "tiny",
                           "--out", str(tmp_path), "--repeats", "1"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "device_check.json").read_text())

    assert result["errors"] == {} and result["skipped"] == []
    assert result["device"]["platform"] == "cpu" and result["device"]["peak_tflops"] is None
    assert result["attention"]["auto"] == "cpu" and "CUDA" in result["attention"]["reason"]
    assert result["model"]["layers"] == 2 and result["model"]["compute_dtype"] == "bfloat16"
    assert result["weight_sync"]["seconds"] > 0 and result["weight_sync"]["copy_bytes"] > 0
    assert [(r["attention"], r["implementation"]) for r in result["prefill"]] == [("auto", "cpu"), ("xla", "xla")]
    assert [(r["attention"], r["implementation"]) for r in result["update"]] == [("auto", "cpu"), ("xla", "xla")]
    assert [r["batch"] for r in result["decode"]] == list(device_check.shape_of("tiny").decode_batches)
    for row in result["prefill"] + result["update"]:
        assert row["tokens_per_s"] > 0 and row["mfu"] is None  # no peak known for a CPU
        assert abs(row["tokens_per_s"] * row["seconds"] - row["tokens"]) < 1e-6 * row["tokens"]
    for row in result["decode"]:
        assert row["tokens_per_s"] > 0 and row["hbm_bound_tokens_per_s"] is None and row["fraction_of_bound"] is None
    memory = result["memory"]
    names = [p["name"] for p in memory["programs"]]
    assert "weight sync (one layer)" in names and "actor micro-batch step (auto)" in names
    assert memory["predicted_peak_bytes"] == max(p["predicted_bytes"] for p in memory["programs"]) > 0
    assert memory["peak_bytes_in_use"] is None and memory["measured_over_predicted"] is None  # CPU: no statistics

    table = (tmp_path / "device_check.md").read_text()
    assert "| " + " | ".join(device_check.THROUGHPUT_COLUMNS) + " |" in table
    assert "| " + " | ".join(device_check.MEMORY_COLUMNS) + " |" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| section")]
    sections = [line.split(" | ")[0][2:] for line in rows]
    assert sections.count("prefill") == 2 and sections.count("actor update") == 2 and "weight sync" in sections
    assert all(line.count("|") == len(device_check.THROUGHPUT_COLUMNS) + 1 for line in rows
               if line.split(" | ")[0][2:] in ("prefill", "decode", "actor update", "weight sync"))


def test_peaks_come_from_the_device_kind_or_the_flags():
    assert device_check.peaks_for("NVIDIA H100 80GB HBM3", None, None) == (989.0, 3.35, "table")
    assert device_check.peaks_for("NVIDIA H100 PCIe", None, None) == (756.0, 2.0, "table")
    assert device_check.peaks_for("NVIDIA H200", None, None) == (989.0, 4.8, "table")
    assert device_check.peaks_for("NVIDIA H200", 900.0, None) == (900.0, 4.8, "flags")
    assert device_check.peaks_for("cpu", None, None) == (None, None, "unknown device")
