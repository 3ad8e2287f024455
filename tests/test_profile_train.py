"""The step profiler of the benchmarks: what it counts as each kind of work, how it sums a step, and
the whole command on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import HH, ROOT, need

sys.path.insert(0, str(ROOT / "benchmarks"))
import profile_train  # noqa: E402


@pytest.mark.parametrize(("name", "kind"), [
    ("triton_tem_fused_flex_attention_backward_0", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "matmul"),
    ("aten::addmm", "matmul"),
    ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>", "optimizer"),
    ("aten::_foreach_norm", "optimizer"),
    ("aten::native_layer_norm_backward", "other"),  # a norm of activations, not clipping's
    ("triton_poi_fused_add_gelu_3", "other"),
])
def test_kernels_and_operators_are_put_in_their_kind(name, kind):
    assert profile_train.kind(name) == kind


def test_a_profile_sums_per_step_and_tells_the_device_idle_share():
    events = [("sm90_xmma_gemm", 30_000.0), ("triton_tem_fused_flex_attention_0", 10_000.0),
              ("sm90_xmma_gemm", 20_000.0), ("multi_tensor_apply_kernel<FusedAdam>", 10_000.0),
              ("triton_poi_fused_mul_0", 10_000.0)]  # microseconds over two steps
    summary = profile_train.summarize(events, step_walls=[0.05, 0.05], on_device=True)
    assert summary["steps"] == 2 and summary["busy_ms_per_step"] == pytest.approx(40.0)
    assert summary["wall_ms_per_step"] == pytest.approx(50.0) and summary["device_idle_share"] == pytest.approx(0.2)
    assert summary["share"] == pytest.approx({"attention": 0.125, "optimizer": 0.125, "matmul": 0.625,
                                              "other": 0.125})
    assert summary["longest"][0] == {"name": "sm90_xmma_gemm", "ms_per_step": 25.0, "kind": "matmul"}
    assert "device_idle_share" not in profile_train.summarize(events, [0.05, 0.05], on_device=False)


@pytest.mark.integration
def test_the_profiler_runs_our_train_step_on_the_cpu(tmp_path):
    """The small decoder on 48 hh pairs: two steps of warm-up, three profiled; each kind of work of a
    train step is found, and the command is logged like every benchmark."""
    need(HH)
    import pythia_1b_shape

    model = pythia_1b_shape.build(tmp_path / "small-decoder", "default", small=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "RM_BENCH_WORK": str(tmp_path / "work"),
           "RM_BENCH_LOG": str(tmp_path / "results.jsonl")}
    out = tmp_path / "profile.json"
    done = subprocess.run([sys.executable, "benchmarks/profile_train.py", "--case", "hh", "--model", str(model),
                           "--data", str(HH.parent), "--max-length", "256", "--batch-size", "4",
                           "--max-train-pairs", "48", "--max-test-pairs", "8", "--wait", "2", "--active", "3",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    profile = json.loads(out.read_text())
    assert profile["steps"] == 3 and profile["device"] == "cpu"
    assert profile["wall_ms_per_step"] >= profile["busy_ms_per_step"] > 0
    assert all(profile["share"][k] > 0 for k in ("attention", "optimizer", "matmul"))
    assert sum(profile["share"].values()) == pytest.approx(1.0)
    assert "train.max_steps=6" in profile["settings"]  # wait + warm-up step + active: no step more
    assert "3 steps:" in done.stdout and "matmul" in done.stdout
    [logged] = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert logged["command"].startswith("python benchmarks/profile_train.py --case hh")
