"""The benchmark suites as a smoke test, so they never rot: bench/ runs on CPU in CI.

Runs, on tiny shapes (bench/lkbench/cases.py, grid "smoke"): the pytest-benchmark suites with
--benchmark-disable (every implementation × fwd/bwd/fwdbwd once, and the end-to-end step), the
collector that writes the results JSON (into a tmp dir, never bench/results/), the report (Markdown,
and the PNG when matplotlib is installed) and the regression gate, each as `python -m bench.<tool>` from the
repository root with nothing but the root on PYTHONPATH, as on a GPU machine without an install. Nothing here
checks speed: a CPU run under Triton's interpreter measures nothing; it proves every code path still runs
and agrees.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is in the [test] extra")
pytest.importorskip("peft", reason="peft is in the [test] extra")
pytest.importorskip("transformers", reason="transformers is in the [test] extra")

REPO = Path(__file__).resolve().parent.parent
# Every implementation must run; only ours_cuda may be skipped, and only when lora_kernels refuses it.
MUST_RUN = ["base", "fused", "fused_gemm", "split_gemm", "ours_torch", "hybrid", "peft", "torch"]
SCHEMA_TOP = ["device", "torch", "triton", "commit", "date", "cases"]
SCHEMA_CASE = ["name", "M", "K", "N", "r", "dropout", "dtype", "base_ms", "fused_ms", "peft_ms", "torch_ms",
               "fused_peak_mb", "peft_peak_mb", "fused_saved_mb", "peft_saved_mb"]


def _env():
    # The repository root alone on PYTHONPATH: no sys.path patching, no installed copy shadowing the tree.
    env = dict(os.environ, LORA_BENCH_GRID="smoke", LORA_BENCH_E2E="smoke", PYTHONPATH=str(REPO))
    env.pop("LORA_KERNELS_BACKEND", None)
    env.pop("LORA_KERNELS_GEMM", None)
    env.pop("LORA_BENCH_MATCH", None)
    return env


def _run(args, **kw):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=900, **kw)


def _check(proc, what):
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """The suite and the collector, started together (they are independent; two cores halve the wait)."""
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    suite = subprocess.Popen([sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider",
                              "--benchmark-disable", "-rs"], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    collect = _run(["-m", "bench.collect", "--grid", "smoke", "--warmup", "1", "--reps", "1", "--e2e", "smoke",
                    "--out", str(out)])
    suite_out, _ = suite.communicate(timeout=900)
    return suite.returncode, suite_out, collect, out


def test_pytest_benchmark_suites_run(smoke_runs):
    rc, out, _, _ = smoke_runs
    assert rc == 0, f"pytest bench/ --benchmark-disable failed ({rc}):\n{out[-8000:]}"
    assert " passed" in out
    # Skip reasons start with the implementation's name: a skip of anything but ours_cuda is a breakage.
    for line in out.splitlines():
        if line.startswith("SKIPPED"):
            assert "ours_cuda:" in line, line


def test_collector_writes_the_schema(smoke_runs):
    _, _, proc, out = smoke_runs
    _check(proc, "python -m bench.collect")
    doc = json.loads(out.read_text())
    for key in SCHEMA_TOP:
        assert doc.get(key) is not None or key == "commit", f"results file lacks {key!r}"
    assert doc["smoke"] is True
    assert len(doc["cases"]) >= 2
    for case in doc["cases"]:
        for key in SCHEMA_CASE:
            assert key in case, f"{case['name']} lacks {key!r}"
        for impl in MUST_RUN:
            d = case["impls"][impl]
            assert "skipped" not in d, f"{case['name']}: {impl} skipped: {d.get('skipped')}"
            for p in ("fwd_ms", "bwd_ms", "fwdbwd_ms"):
                assert d[p] is not None and d[p] > 0
            assert d["saved_mb"] is not None
        # Off CUDA LORA_KERNELS_GEMM=auto takes the fused path without measuring, so there is nothing to record.
        assert case["impls"]["fused"]["gemm"] == {}
        assert case["ratios"]["split_gemm_over_fused_gemm"] > 0
        cuda = case["impls"]["ours_cuda"]
        assert "skipped" in cuda or cuda.get("fwdbwd_ms"), cuda
        assert case["errors"] == [], case["errors"]
    e2e = doc["e2e"][0]
    assert set(e2e["impls"]) == {"peft", "fused"}
    assert e2e["impls"]["fused"]["lora_kernels_backend"] == "triton"
    # Same adapters on both sides, or the comparison would be unfair.
    assert e2e["impls"]["fused"]["trainable_params"] == e2e["impls"]["peft"]["trainable_params"] > 0
    assert e2e["ratios"]["tokens_per_s_fused_over_peft"] > 0


def test_report_and_regression_gate(smoke_runs, tmp_path):
    _, _, proc, out = smoke_runs
    _check(proc, "python -m bench.collect")
    try:
        import matplotlib  # noqa: F401  (not in the [test] extra: the chart is checked where it is installed)
        png = ["--png", str(tmp_path / "smoke.png")]
    except ImportError:
        png = ["--no-png"]
    rep = _run(["-m", "bench.report", str(out), "--md", str(tmp_path / "smoke.md"), *png])
    _check(rep, "python -m bench.report")
    md = (tmp_path / "smoke.md").read_text()
    assert "Smoke run" in md and "| base ms | fused ms |" in md and "End to end" in md
    if png[0] == "--png":
        assert (tmp_path / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    same = _run(["-m", "bench.compare", str(out), "--baseline", str(out)])
    _check(same, "python -m bench.compare against itself")
    doc = json.loads(out.read_text())
    doc["cases"][0]["fused_ms"] *= 2
    worse = tmp_path / "worse.json"
    worse.write_text(json.dumps(doc))
    assert _run(["-m", "bench.compare", str(worse), "--baseline", str(out)]).returncode == 1


def test_bench_hybrid_and_gemm_paths_match_fused_gradients():
    """The bench-only hybrid and both GEMM paths regenerate the same dropout mask as ours, so with one seed all
    gradients agree."""
    import torch

    from bench.lkbench import cases as C
    from bench.lkbench import impls as I

    case = C.Case(C.SMOKE_SHAPES[0], 32, 4, 0.1, "fp32", "fp32")
    t = I.make_tensors(case, "cpu")
    grads = {}
    others = ("hybrid", "fused_gemm", "split_gemm")
    for name in ("fused",) + others:
        built = I.build(name, case, t)
        x = t.x.detach().requires_grad_(True)
        torch.manual_seed(7)
        grads[name] = torch.autograd.grad(built(x), built.grad_inputs(x), t.dy)
    for name in others:
        for g_ref, g in zip(grads["fused"], grads[name]):
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


def test_regression_gate_baseline_is_a_results_file_not_a_sidecar(tmp_path):
    """A GPU run leaves <stem>.stages.json and <stem>.pytest-benchmark.json beside <stem>.json; the gate's
    baseline is the newest <gpu>-<date>.json, never one of those."""
    from bench.compare import find_baseline

    doc = {"device": "NVIDIA H100 80GB HBM3"}
    for name in ("2026-01-02.json", "2026-01-03.json", "2026-01-03.stages.json", "2026-01-03.pytest-benchmark.json"):
        (tmp_path / f"nvidia-h100-80gb-hbm3-{name}").write_text("{}")
    (tmp_path / "nvidia-h200-2026-01-04.json").write_text("{}")
    new = tmp_path / "new.json"
    assert find_baseline(new, doc, tmp_path).name == "nvidia-h100-80gb-hbm3-2026-01-03.json"
    assert find_baseline(new, {"device": "NVIDIA A100"}, tmp_path) is None
