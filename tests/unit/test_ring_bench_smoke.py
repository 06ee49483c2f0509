"""The GPU benchmarks run end to end, tiny, on CPU, in this process (one rank: no spawn).

Their multi-rank paths are the library's, covered by test_ring_attention.py; this checks that
the scripts themselves work and that their built-in correctness checks hold.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch.distributed as dist

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_ring_attention_bench_tiny_cpu(tmp_path):
    out = tmp_path / "ring.json"
    load("ring_attention").main(
        ["--device", "cpu", "--tiny", "--nproc", "1", "--warmup", "0", "--iters", "1", "--scaling", "--out", str(out)]
    )
    assert not dist.is_initialized()
    result = json.loads(out.read_text())
    assert [r["tokens"] for r in result["lengths"]] == [256, 1000]
    for row in result["lengths"]:
        assert row["ring_s"] > 0 and row["sdpa_tflops"] > 0
        assert row["ring_max_abs_err"] < 1e-4  # vs plain attention of sampled rows
    assert result["scaling"]["tokens"] == 512 and result["scaling"]["speedup"] > 0


def test_decode_bench_tiny_cpu(tmp_path):
    out = tmp_path / "decode.json"
    load("decode").main(["--device", "cpu", "--tiny", "--nproc", "1", "--warmup", "1", "--iters", "3", "--out", str(out)])
    assert not dist.is_initialized()
    result = json.loads(out.read_text())
    assert result["floor_s"] > 0 and result["partial_s"] > 0 and result["collective_s"] > 0
    assert result["collective_max_abs_err"] < 1e-5
    # The bus path really ran against nats-server and, on CPU, merged to the same bits.
    assert result["bus_s"] > 0 and result["bus_vs_collective_max_abs_diff"] == 0
