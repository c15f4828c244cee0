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
                    "--dora", "--moe", "--out", str(out)])
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
    _check_side_by_side(doc)
    e2e = doc["e2e"][0]
    assert set(e2e["impls"]) == {"peft", "fused"}
    assert e2e["impls"]["fused"]["lora_kernels_backend"] == "triton"
    # Same adapters on both sides, or the comparison would be unfair.
    assert e2e["impls"]["fused"]["trainable_params"] == e2e["impls"]["peft"]["trainable_params"] > 0
    assert e2e["ratios"]["tokens_per_s_fused_over_peft"] > 0


def _check_side_by_side(doc):
    """The DoRA and MoE-experts cases: every implementation measured and agreeing with the float32 reference, but
    PEFT on experts with dropout, which PEFT refuses (recorded with its own message); the ratios the targets name."""
    from bench.lkbench.dora import DORA_IMPLS
    from bench.lkbench.moe import MOE_IMPLS

    assert [c["name"] for c in doc["dora"]] == ["dora/tiny/M32/r4/p0.1/fp16/Afp32"]
    assert [c["name"].split("/")[1] + "/" + c["name"].split("/")[6] for c in doc["moe"]] == [
        "qwen3-tiny/p0", "gpt-oss-tiny/p0.1"]
    for c, names in [(c, DORA_IMPLS) for c in doc["dora"]] + [(c, MOE_IMPLS) for c in doc["moe"]]:
        assert c["errors"] == [], c["errors"]
        for impl in names:
            d = c["impls"][impl]
            if impl == "peft" and c["dropout"] > 0:
                assert "lora_dropout" in d["skipped"] and c["peft_ms"] is None, d
                continue
            assert "skipped" not in d, f"{c['name']}: {impl} skipped: {d.get('skipped')}"
            assert d["fwd_ms"] > 0 and d["bwd_ms"] > 0 and d["fwdbwd_ms"] == c[f"{impl}_ms"] > 0
            assert d["saved_mb"] is not None
            # Held to the suite's reference: all but the base and our LoRA (held to LoRA's in the op cases).
            assert ("rel_err" in d) == (impl not in ("base", "lora")), (c["name"], impl)
    r = doc["dora"][0]["ratios"]
    assert all(r[k] > 0 for k in ("dora_over_lora", "peft_dora_over_dora", "dora_saved_over_peft_dora"))
    for c in doc["moe"]:
        assert c["ratios"]["ours_over_base"] > 0
        assert (c["ratios"]["peft_over_ours"] is None) == (c["dropout"] > 0)
        assert c["experts_implementation"].startswith("grouped_mm: ")
        assert c["ours_functions"], "no lora_kernels autograd Function in ours' graph"
        assert c["ours_gemm"] == {}  # off CUDA auto does not measure the experts' GEMM paths


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
    assert "## DoRA: forward + backward" in md and "`dora/tiny/M32/r4/p0.1/fp16/Afp32`" in md
    assert "## MoE experts: forward + backward" in md and "lora_dropout" in md and "## Targets" not in md
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


def test_report_holds_dora_and_moe_ratios_to_their_targets():
    """A GPU-run document (ratios made up here, the report's logic under test): each headline DoRA and MoE ratio
    gets its issue's target and verdict in the Targets section; cases off the headline get none."""
    from bench.report import markdown, targets

    def dora(p, shape, K, N, **ratios):
        return {"name": f"dora/{shape}/M8192/r16/p{p:g}/bf16/Afp32", "shape": shape, "M": 8192, "K": K, "N": N,
                "r": 16, "dropout": p, "dtype": "bf16", "adapter_dtype": "fp32", "ratios": ratios}

    def moe(p, shape, T=4096, **ratios):
        return {"name": f"moe/{shape}/T{T}/p{p:g}", "shape": shape, "E": 128, "top_k": 8, "H": 2048, "I": 768, "T": T,
                "r": 16, "dropout": p, "dtype": "bf16", "adapter_dtype": "fp32", "ratios": ratios}

    doc = {"device": "NVIDIA H200", "torch": "t", "triton": "t", "commit": "c", "date": "d", "cases": [], "e2e": [],
           "dora": [dora(0.1, "7b.q_proj", 4096, 4096, dora_over_lora=1.5, peft_dora_over_dora=2.0,
                         dora_saved_over_peft_dora=0.7),
                    dora(0.0, "8b.up_proj", 4096, 14336, dora_over_lora=1.3, peft_dora_over_dora=1.5,
                         dora_saved_over_peft_dora=None),
                    dora(0.0, "7b.up_proj", 4096, 11008, dora_over_lora=9.0)],
           "moe": [moe(0.0, "qwen3-30b-a3b", ours_over_base=1.1, peft_over_ours=1.9, ours_peak_over_peft=0.4),
                   moe(0.1, "gpt-oss-20b", ours_over_base=1.3, peft_over_ours=None),
                   moe(0.0, "qwen3-30b-a3b", T=1024, ours_over_base=9.0)]}
    rows = {(t, c): (v, ok) for t, c, v, ok in targets(doc)}
    q, up = "dora/7b.q_proj/M8192/r16/p0.1/bf16/Afp32", "dora/8b.up_proj/M8192/r16/p0/bf16/Afp32"
    assert rows[("DoRA/LoRA ≤ 1.6 (p=0.1)", q)] == (1.5, True)
    assert rows[("PEFT DoRA/ours ≥ 1.8 (p=0.1)", q)] == (2.0, True)
    assert rows[("saved activations DoRA/PEFT DoRA ≤ 0.6", q)] == (0.7, False)
    assert rows[("DoRA/LoRA ≤ 1.25 (p=0)", up)] == (1.3, False)
    assert rows[("PEFT DoRA/ours ≥ 1.5 (p=0)", up)] == (1.5, True)
    assert rows[("saved activations DoRA/PEFT DoRA ≤ 0.6", up)] == (None, None)
    assert rows[("MoE ours/base ≤ 1.15 (p=0)", "moe/qwen3-30b-a3b/T4096/p0")] == (1.1, True)
    assert rows[("MoE PEFT/ours ≥ 2.0", "moe/qwen3-30b-a3b/T4096/p0")] == (1.9, False)
    assert rows[("MoE peak memory ours/PEFT ≤ 0.5", "moe/qwen3-30b-a3b/T4096/p0")] == (0.4, True)
    assert rows[("MoE ours/base ≤ 1.25 (p=0.1)", "moe/gpt-oss-20b/T4096/p0.1")] == (1.3, False)
    assert not any("7b.up_proj" in c or "T1024" in c for _, c in rows)  # not headline cases
    assert len(rows) == 10
    md = markdown(doc)
    assert "| DoRA/LoRA ≤ 1.6 (p=0.1) | `" + q + "` | 1.500 | yes |" in md
    assert "| MoE PEFT/ours ≥ 2.0 | `moe/qwen3-30b-a3b/T4096/p0` | 1.900 | no |" in md


def test_collector_selects_the_dora_and_moe_headline_cases(capsys):
    """What the GPU stages `dora` and `moe` will measure (bench/gpu_stages.py), listed without a GPU."""
    from bench import collect
    from bench.lkbench.dora import dora_cases
    from bench.lkbench.moe import moe_cases

    assert collect.main(["--no-ops", "--dora", "--moe", "--grid", "headline", "--check-args"]) == 0
    assert "6 dora case(s), 4 moe case(s)" in capsys.readouterr().out
    assert [(c.K, c.N, c.dropout) for c in dora_cases("headline", "", require_cuda=False)] == [
        (4096, 4096, 0.1), (4096, 4096, 0.0), (4096, 14336, 0.1), (4096, 14336, 0.0), (14336, 4096, 0.1),
        (14336, 4096, 0.0)]
    assert {(c.M, c.r, c.dtype, c.adapter_dtype) for c in dora_cases("headline", "", require_cuda=False)} == {
        (8192, 16, "bf16", "fp32")}
    moe = moe_cases("headline", "", require_cuda=False)
    assert [(c.shape.E, c.shape.top_k, c.shape.H, c.shape.I, c.T, c.r, c.dropout, c.dtype) for c in moe] == [
        (128, 8, 2048, 768, 4096, 16, 0.0, "bf16"), (128, 8, 2048, 768, 4096, 16, 0.1, "bf16"),
        (32, 4, 2880, 2880, 4096, 16, 0.0, "bf16"), (32, 4, 2880, 2880, 4096, 16, 0.1, "bf16")]
    assert collect.main(["--no-ops", "--moe", "--grid", "headline", "--match", "nothing", "--check-args"]) == 1


def test_truncated_record_survives_a_later_stage():
    """A stage cut short (DoRA) stays recorded after a later stage into the same file (MoE) completes; measuring
    the missing cases later clears it."""
    from bench.collect import _truncated

    doc = {}
    _truncated(doc, "headline", ["dora/b"], ["dora/a", "dora/b"])
    _truncated(doc, "headline", [], ["moe/a", "moe/b"])
    assert doc["truncated"]["not_run"] == ["dora/b"]
    _truncated(doc, "headline", [], ["dora/b"])
    assert "truncated" not in doc
