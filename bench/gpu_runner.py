"""Running the stages of a GPU run (bench/gpu_run.py): each stage's command in its own process group under a
time limit, its log, and its record; the environment stage and the background build of the CUDA extension."""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

from bench.gpu_stages import GRACE_S, REPO, Run, Stage, build_argv, build_env, stop


class Interrupted(Exception):
    """SIGTERM or SIGINT reached the orchestrator: stop the stage in flight, keep what was written."""


def _env_vars(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra or {}))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH")
                                                       else []))
    return env


def run_command(run: Run, argv: List[str], log: Path, limit: float, extra_env=None) -> tuple:
    """(exit status, seconds, cut short) of argv with its output appended to `log`, stopped after `limit` s."""
    t0 = time.monotonic()
    with open(log, "ab") as f:
        f.write(f"$ {' '.join(argv)}   # limit {limit:.0f} s, {_now()}\n".encode())
        f.flush()
        run.current = subprocess.Popen(argv, cwd=REPO, env=_env_vars(extra_env), stdout=f, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        cut = False
        try:
            rc = run.current.wait(timeout=None if limit == float("inf") else max(0.1, limit))
        except subprocess.TimeoutExpired:
            cut = True
            stop(run.current)
            rc = run.current.returncode
        finally:
            if run.current.poll() is None:  # Interrupted while waiting
                stop(run.current)
            run.current = None
        f.write(f"# exit status {rc}{' (stopped: time limit)' if cut else ''} after "
                f"{time.monotonic() - t0:.1f} s\n".encode())
    return rc, time.monotonic() - t0, cut


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M:%S UTC")


def _tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


_RESULT_LINE = re.compile(r"^(=+ )?.*\b\d+ (passed|failed|errors?|skipped|deselected)\b|no tests ran|^collect\.py: ")


def _summary(path: Path) -> str:
    """The line that says how a stage went: pytest's result line, collect.py's last word, or the last line."""
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip() and not ln.startswith("#")]
    said = [ln for ln in lines if _RESULT_LINE.search(ln)]
    return (said or lines or [""])[-1].strip("= ")[:300]


def _stage_env_ok(run: Run, stage: Stage) -> Optional[str]:
    missing = [n for n in stage.needs if not run.env.get(n)]
    return None if not missing else f"not here: {', '.join(missing)}"


def run_stage(run: Run, stage: Stage, index: int) -> dict:
    rec = {"name": stage.name, "what": stage.what, "est_s": stage.est_s}
    log = run.logs / f"{index:02d}-{stage.name}.log"
    why = _stage_env_ok(run, stage)
    left = run.left()
    if why is None and left < stage.min_s:
        why = f"deadline: {max(0.0, left):.0f} s left, needs at least {stage.min_s:.0f} s"
    if why:
        rec.update(status="skipped", why=why)
        print(f"[{_now()}] {stage.name}: skipped ({why})", flush=True)
        return rec
    limit = left if stage.budget_s is None else min(stage.budget_s, left)
    t0 = time.monotonic()
    print(f"[{_now()}] {stage.name}: {stage.what} (limit {limit:.0f} s)", flush=True)
    if stage.prepare is not None:
        why = stage.prepare(run, limit - stage.min_s / 2)
        if why:
            log.write_text(why + "\n")
            rec.update(status="failed", why=why, seconds=round(time.monotonic() - t0, 1))
            print(f"[{_now()}] {stage.name}: FAILED: {why}", flush=True)
            return rec
        limit -= time.monotonic() - t0
    rc, secs, cut = run_command(run, stage.argv(run, limit), log, limit)
    rec.update(status="cut" if cut else ("ok" if rc == 0 else "failed"), rc=rc,
               limit_s=None if limit == float("inf") else round(limit),
               seconds=round(time.monotonic() - t0, 1), summary=_summary(log))
    if cut:  # the run's deadline ending a stage is planned for; a stage outrunning its own budget is not
        rec["cut_by"] = "budget" if stage.budget_s is not None and limit >= stage.budget_s else "deadline"
    print(f"[{_now()}] {stage.name}: {rec['status']} in {rec['seconds']:.0f} s: {rec['summary']}", flush=True)
    if rec["status"] != "ok":
        print(_tail(log), flush=True)
    return rec


def report(run: Run) -> Optional[dict]:
    """Regenerate the Markdown and PNG from the results file (a few seconds), within the reserve."""
    if not run.results.exists():
        return None
    limit = max(5.0, min(60.0, run.deadline - time.monotonic() - GRACE_S))
    args = [run.python, "-m", "bench.report", str(run.results)]
    if not run.env.get("matplotlib", True):
        args.append("--no-png")
    rc, secs, cut = run_command(run, args, run.logs / "report.log", limit)
    return {"rc": rc, "seconds": round(secs, 1), "cut": cut}


def detect_env(run: Run) -> Optional[str]:
    """The env stage: the environment record (bench.env) and nvidia-smi's full output into the logs."""
    log = run.logs / "00-env.log"
    if shutil.which("nvidia-smi"):
        run_command(run, ["nvidia-smi"], log, 30)
    out = run.logs / "env.json"
    limit = max(30.0, min(120.0, run.left()))
    try:
        with open(out, "wb") as f:
            proc = subprocess.run([run.python, "-m", "bench.env"], cwd=REPO, env=_env_vars(), stdout=f,
                                  stderr=subprocess.PIPE, timeout=limit)
    except subprocess.TimeoutExpired:
        return f"python -m bench.env did not finish in {limit:.0f} s (torch import or CUDA initialisation hangs?)"
    if proc.returncode != 0:
        return f"python -m bench.env failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-2000:]}"
    run.env = json.loads(out.read_text())
    run.stem = os.environ.get("LORA_BENCH_STEM") or run.env["stem"]
    return None


def start_build(run: Run) -> None:
    """The CUDA extension's build, in the background at low priority so it does not slow the Triton numbers."""
    if run.env.get("cuda_extension_built") or not run.env.get("nvcc") or not run.env.get("cuda_available"):
        return
    log = open(run.logs / "build-ext.log", "ab")
    log.write(f"$ {' '.join(build_argv(run))}   # {build_env(run)}\n".encode())
    log.flush()
    run.build = subprocess.Popen(["nice", "-n", "10", *build_argv(run)], cwd=REPO, env=_env_vars(build_env(run)),
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
