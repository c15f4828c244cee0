"""bench/run_gpu.sh (bench/gpu_run.py, bench/gpu_stages.py) on a CPU, so the GPU command cannot rot between GPU runs.

The dry run is the command a lent GPU machine runs, with --dry-run: it detects the environment for real,
prints the deadline plan, runs every stage's command line in its parse-only form (the collector's and the
report's --check-args, pytest --collect-only that must select tests, setup.py build_ext --help) and checks
the output folder against the limits of what comes back from such a machine. The deadline logic itself is
tested here with real processes: a stage past its limit is stopped with its process group, later stages that
no longer fit are skipped, and the collector keeps valid JSON when it is stopped.
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from bench import gpu_run as G

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "run_gpu.sh"
# Every stage the quick preset does not run (the ci, adapters and dora_moe presets'), in one dry run.
OTHER_STAGES = [s for s in G.STAGES if s not in G.PRESETS["quick"].stages]


def _script(args, **kw):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("LORA_BENCH_DEADLINE_S", None)
    env.pop("LORA_BENCH_STEM", None)
    return subprocess.Popen([str(SCRIPT), *args], cwd="/", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kw)


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    """The quick preset's dry run exactly as a GPU machine would start it (from another folder, too), and the
    other presets' stages, side by side."""
    quick_out = tmp_path_factory.mktemp("quick")
    others_out = tmp_path_factory.mktemp("others")
    quick = _script(["--dry-run", "--out", str(quick_out)])
    others = _script(["--dry-run", "--stages", ",".join(OTHER_STAGES), "--out", str(others_out)])
    return {name: (proc.communicate(timeout=900)[0], proc.returncode, out)
            for name, proc, out in (("quick", quick, quick_out), ("others", others, others_out))}


def _stages_doc(out: Path) -> dict:
    (path,) = out.glob("*.stages.json")
    return json.loads(path.read_text())


@pytest.mark.parametrize("which", ["quick", "others"])
def test_dry_run_parses_every_stage(dry_runs, which):
    text, rc, out = dry_runs[which]
    assert rc == 0, text[-8000:]
    doc = _stages_doc(out)
    want = list(G.PRESETS["quick"].stages) if which == "quick" else OTHER_STAGES
    assert [r["name"] for r in doc["stages"]] == ["env"] + want
    assert all(r["status"] == "parsed" for r in doc["stages"][1:]), doc["stages"]
    for name in want:
        assert f"parses {name}:" in text
    assert "FAILS" not in text


def test_dry_run_records_the_environment_and_plan(dry_runs):
    text, _, out = dry_runs["quick"]
    env = _stages_doc(out)["env"]
    import torch

    for key in ("device", "torch", "triton", "commit", "numpy", "cuda_available", "stem"):
        assert key in env, key
    assert env["torch"] == torch.__version__
    assert env["cuda_available"] == torch.cuda.is_available()
    # The commit comes from git here; on a copy without .git from LORA_BENCH_COMMIT (results.environment).
    assert env["commit"] is None or len(env["commit"]) == 40
    assert "deadline plan (480 s" in text
    for name in G.PRESETS["quick"].stages:
        assert any(line.strip().startswith(name + " ") for line in text.splitlines()), name


def test_dry_run_output_fits_what_comes_back(dry_runs):
    _, _, out = dry_runs["quick"]
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert G.check_layout(out, files) == []
    assert all(p.parent == out for p in files), "everything flat in --out"
    names = {p.name.split(".", 1)[1] for p in files}
    assert names == {"stages.json", "logs.tar.gz"}, names
    (tar_path,) = out.glob("*.logs.tar.gz")
    with tarfile.open(tar_path) as tar:
        members = [m.name.split("/", 1)[1] for m in tar.getmembers()]
    assert "env.json" in members
    assert sum(m.endswith(".log") and m[:2].isdigit() for m in members) == len(G.PRESETS["quick"].stages)


def test_layout_check_catches_each_limit(tmp_path):
    files = []
    for i in range(G.LIMITS["files"]):
        f = tmp_path / f"f{i}.json"
        f.write_text("{}")
        files.append(f)
    assert G.check_layout(tmp_path, files) == []
    deep = tmp_path / "a" / "b" / "c" / "x.log"
    deep.parent.mkdir(parents=True)
    deep.write_text("")
    odd = tmp_path / "no space allowed.md"
    odd.write_text("")
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(G.LIMITS["file_bytes"] + 1)
    problems = G.check_layout(tmp_path, files + [deep, odd, big])
    joined = "\n".join(problems)
    assert "11 files" in joined
    assert "folders deep" in joined and "a/b/c/x.log" in joined
    assert "'no space allowed.md'" in joined
    assert "big.png" in joined and "bytes" in joined


def test_long_logs_are_capped_in_the_tarball(tmp_path):
    log = tmp_path / "01-x.log"
    log.write_bytes(b"a" * G.LOG_CAP_BYTES + b"TAIL")
    capped = G._capped(log)
    assert len(capped) < G.LOG_CAP_BYTES + 100 and capped.endswith(b"TAIL") and b"bytes cut" in capped


def _sleeper(seconds, pid_file=None):
    """A stage whose command starts a grandchild (as pytest and collect start compilers) and waits for it. A shell,
    not Python: it starts in milliseconds even on a loaded machine, so the grandchild exists before the limit."""
    if pid_file is None:
        cmd = f"sleep {seconds}"
    else:
        cmd = f"sleep {seconds} & echo $! > {pid_file}; wait"
    return G.Stage("sleepy", "sleeps", est_s=1, min_s=0.5, budget_s=None,
                   argv=lambda run, limit: ["sh", "-c", cmd], checks=lambda run: [], needs=())


def _run(tmp_path, deadline_s, reserve_s=0.5):
    logs = tmp_path / "logs"
    logs.mkdir(parents=True)
    return G.Run(python=sys.executable, out=tmp_path, logs=logs, deadline=time.monotonic() + deadline_s,
                 deadline_s=deadline_s, reserve_s=reserve_s)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent, the stopped stage, is gone and init reaps it).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_a_stage_past_the_deadline_is_stopped_with_its_children(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    run = _run(tmp_path, deadline_s=3.0)
    t0 = time.monotonic()
    rec = G.run_stage(run, _sleeper(60, pid_file), 1)
    took = time.monotonic() - t0
    assert rec["status"] == "cut" and rec["cut_by"] == "deadline" and rec["rc"] != 0, rec
    assert 2.0 < took < 2.5 + G.GRACE_S, took
    assert pid_file.exists(), "the stage did not start its grandchild within 2.5 s"
    # The group gets the signal at once, but on a loaded machine the grandchild may not have been scheduled to
    # die yet when the stage returns: it must be gone within a few seconds (left alone it would live 60 s).
    pid, gone_by = int(pid_file.read_text()), time.monotonic() + 5.0
    while _alive(pid) and time.monotonic() < gone_by:
        time.sleep(0.05)
    assert not _alive(pid), "the stage's grandchild outlived it"
    # Nothing is left of the deadline: the next stage is skipped, not started.
    nxt = G.run_stage(run, _sleeper(1), 2)
    assert nxt["status"] == "skipped" and nxt["why"].startswith("deadline"), nxt
    # A stage that outruns its own budget, with time to spare, is cut by its budget: a failure of the run.
    slow = dataclasses.replace(_sleeper(60), budget_s=1.0)
    rec = G.run_stage(_run(tmp_path / "again", deadline_s=60.0), slow, 1)
    assert rec["status"] == "cut" and rec["cut_by"] == "budget" and rec["limit_s"] == 1, rec


def test_stage_limits_never_pass_the_deadline():
    """Planned as if every stage took all it may: no stage of a time-limited preset ends after its deadline less
    the reserve, the quick preset reaches its headline, smoke and shapes stages, and the time-limited presets
    fit a lent machine's 10-minute command."""
    for name, preset in G.PRESETS.items():
        stages = [G.STAGES[s] for s in preset.stages]
        horizon = preset.deadline_s - G.RESERVE_S
        for row in G.plan(stages, preset.deadline_s):
            w = row["worst"]
            if w["runs"]:
                assert w["start_s"] + w["limit_s"] <= horizon + 1, (name, row)
        if name != "ci":
            assert preset.deadline_s + G.GRACE_S <= G.COMMAND_LIMIT_S - 60, name
    quick = {r["stage"]: r for r in G.plan([G.STAGES[s] for s in G.PRESETS["quick"].stages], 480)}
    assert all(quick[s]["worst"]["runs"] for s in ("headline", "smoke_tests"))
    assert all(quick[s]["expected"]["runs"] for s in ("headline", "smoke_tests", "shapes", "e2e", "ext"))
    short = {r["stage"]: r for r in G.plan([G.STAGES[s] for s in G.PRESETS["short"].stages], 180)}
    assert short["headline"]["worst"]["runs"] and short["headline"]["worst"]["limit_s"] >= G.STAGES["headline"].est_s
    # dora_moe: DoRA's estimate within its cap, and MoE well past its minimum even when DoRA takes all of its cap.
    dm = {r["stage"]: r for r in G.plan([G.STAGES[s] for s in G.PRESETS["dora_moe"].stages], 240)}
    assert dm["dora"]["worst"]["runs"] and dm["dora"]["worst"]["limit_s"] >= G.STAGES["dora"].est_s
    assert dm["moe"]["worst"]["runs"] and dm["moe"]["expected"]["limit_s"] >= G.STAGES["moe"].est_s


def test_deadline_and_stage_arguments(monkeypatch):
    monkeypatch.delenv("LORA_BENCH_DEADLINE_S", raising=False)
    assert G.parse_args([]).deadline_s == 480
    assert G.parse_args(["--preset", "short"]).deadline_s == 180
    assert G.parse_args(["--preset", "dora_moe"]).stage_list == ["dora", "moe"]
    assert G.parse_args(["--preset", "dora_moe"]).deadline_s == 240
    assert G.parse_args(["--deadline-s", "none"]).deadline_s is None
    assert G.parse_args(["--deadline-s", "300", "--preset", "short"]).deadline_s == 300
    monkeypatch.setenv("LORA_BENCH_DEADLINE_S", "200")
    assert G.parse_args([]).deadline_s == 200
    for bad in (["--deadline-s", "-5"], ["--deadline-s", "soon"], ["--stages", "headline,nope"]):
        with pytest.raises(SystemExit):
            G.parse_args(bad)
    assert G.parse_args(["--stages", "e2e,headline"]).stage_list == ["e2e", "headline"]


def test_collector_stopped_mid_run_keeps_valid_json(tmp_path):
    """SIGTERM (what a stage past its limit gets) after the first case is saved: exit 124, the file parses and
    holds the measured case, and the cases not measured are listed."""
    out = tmp_path / "r.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "bench.collect", "--grid", "smoke", "--warmup", "1", "--reps", "1",
                             "--e2e", "smoke", "--out", str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 124, text[-4000:]
    doc = json.loads(out.read_text())
    assert len(doc["cases"]) >= 1 and doc["device"] and "commit" in doc
    names = {c["name"] for c in doc["cases"]}
    assert not names & set(doc.get("truncated", {}).get("not_run", []))
    assert "stopped by SIGTERM" in text


def test_the_run_loop_writes_results_report_and_archive(tmp_path, monkeypatch, capsys):
    """The real (not dry) loop on a CPU, with one stage that needs no GPU: the collector on one smoke case, the
    report after it, the stage record and the log archive, all within the limits; a GPU stage is skipped
    with the reason."""
    import torch

    stage = G.collect_stage("cpu_case", "one smoke case", est_s=30, min_s=5, budget_s=None, margin_s=10, needs=(),
                            args=lambda run: ["--grid", "smoke", "--match", "/fp32/", "--impls", "base,fused,peft",
                                              "--warmup", "1", "--reps", "1"])
    monkeypatch.setitem(G.STAGES, "cpu_case", stage)
    monkeypatch.delenv("LORA_BENCH_STEM", raising=False)
    handler = signal.getsignal(signal.SIGTERM)
    cuda = torch.cuda.is_available()
    stages = "cpu_case" if cuda else "cpu_case,headline"  # without a GPU, headline must be skipped, saying why
    assert G.main(["--stages", stages, "--out", str(tmp_path), "--deadline-s", "600"]) == 0, capsys.readouterr()
    assert signal.getsignal(signal.SIGTERM) is handler
    files = sorted(tmp_path.iterdir())
    assert G.check_layout(tmp_path, files) == []
    kinds = {f.name.split(".", 1)[1] for f in files}
    assert {"json", "md", "stages.json", "logs.tar.gz"} <= kinds <= {"json", "md", "png", "stages.json", "logs.tar.gz"}
    (results,) = [f for f in files if f.name.endswith(".json") and f.name.count(".") == 1]
    doc = json.loads(results.read_text())
    assert [c["name"] for c in doc["cases"]] == ["tiny/M32/r4/p0/fp32/Afp32"]
    assert all(k in doc for k in ("device", "torch", "triton", "commit"))
    env_rec, rec, *gpu_rec = _stages_doc(tmp_path)["stages"]
    assert env_rec["name"] == "env" and env_rec["status"] == "ok"
    assert rec["name"] == "cpu_case" and rec["status"] == "ok" and rec["report"]["rc"] == 0, rec
    assert "collect.py: wrote" in rec["summary"]
    captured = capsys.readouterr()
    assert "stages: env ok" in captured.out and "cpu_case ok" in captured.out
    assert "tiny/M32/r4/p0/fp32/Afp32: fused" in captured.out
    if not cuda:
        assert gpu_rec[0]["status"] == "skipped" and gpu_rec[0]["why"] == "not here: cuda_available", gpu_rec
        assert "torch sees no CUDA GPU" in captured.err
