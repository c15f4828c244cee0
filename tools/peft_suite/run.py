"""Run PEFT's tests/test_custom_models.py plain and with every PEFT model fused, and compare (see README.md here).

    python tools/peft_suite/run.py extract --git-dir GIT_DIR --rev REV --dest /tmp/peft_tests
    python tools/peft_suite/run.py run --peft-tests /tmp/peft_tests --out /tmp/peft_suite [--mode plain|fused|both]
    python tools/peft_suite/run.py compare --out /tmp/peft_suite [--markdown FILE]

Nothing here downloads: `extract` reads a local git clone of PEFT, the runs set HF_HUB_OFFLINE=1 (tests that need
the Hub fail offline and are counted apart), and PEFT's tests stay outside this repository.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TEST_FILE = "tests/test_custom_models.py"
# PEFT's pyproject adds coverage options; the extracted tree gets this ini instead (markers only).
PYTEST_INI = """[pytest]
markers =
    single_gpu_tests: tests that run on a single GPU
    multi_gpu_tests: tests that run on multiple GPUs
    regression: whether to run regression suite test
    bitsandbytes: select bitsandbytes integration tests
"""
FAILED = ("failed", "error")


def extract(args) -> int:
    dest = Path(args.dest)
    if dest.exists() and any(dest.iterdir()):
        return _error("extract", f"{dest} exists and is not empty")
    if dest.resolve().is_relative_to(REPO):
        return _error("extract", f"{dest} is inside this repository: PEFT's tests must stay outside it")
    archive = subprocess.run(["git", f"--git-dir={args.git_dir}", "archive", args.rev, "tests"],
                             capture_output=True)
    if archive.returncode:
        return _error("extract", archive.stderr.decode().strip().splitlines()[-1])
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    (dest / "pytest.ini").write_text(PYTEST_INI)
    commit = subprocess.run(["git", f"--git-dir={args.git_dir}", "rev-parse", args.rev],
                            capture_output=True, text=True).stdout.strip()
    (dest / "PEFT_COMMIT").write_text(commit + "\n")
    print(f"PEFT tests of {commit} in {dest}")
    return 0


def run(args) -> int:
    tests = Path(args.peft_tests).resolve()
    if not (tests / TEST_FILE).is_file():
        return _error("run", f"{tests / TEST_FILE} not found (see `extract`)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = [str(REPO), str(HERE)] + args.extra_path + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if args.backend:
        env["LORA_KERNELS_BACKEND"] = args.backend
    # Node ids (or an @file of them) in the pytest arguments replace the whole file.
    targets = [] if any(a.startswith("@") or "::" in a for a in args.pytest_args) else [TEST_FILE]
    status = 0
    for mode in (("plain", "fused") if args.mode == "both" else (args.mode,)):
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "lk_peft_plugin", "-q",
               "--rootdir", str(tests), "--lk-select", args.select, "--lk-report", str((out / f"{mode}.json").resolve()),
               *(["--lk-fuse"] if mode == "fused" else []), *targets, *args.pytest_args]
        print(f"[{mode}] {' '.join(cmd)}", flush=True)
        with open(out / f"{mode}.log", "w") as log:
            rc = subprocess.run(cmd, cwd=tests, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        print(f"[{mode}] pytest exit status {rc}; log in {out / f'{mode}.log'}", flush=True)
        status = status or (rc not in (0, 1))  # 1: some tests failed, which is what we compare
    return status


def _tally(tests: dict) -> Counter:
    c = Counter()
    for t in tests.values():
        c["network" if t["network"] else t["outcome"]] += 1
    return c


def compare(args) -> int:
    out = Path(args.out)
    try:
        plain = json.loads((out / "plain.json").read_text())["tests"]
        fused = json.loads((out / "fused.json").read_text())["tests"]
    except FileNotFoundError as e:
        return _error("compare", f"{e.filename} not found (run both modes first)")
    lines = ["| outcome | plain | fused |", "|---|---:|---:|"]
    tp, tf = _tally(plain), _tally(fused)
    for key, label in (("passed", "passed"), ("failed", "failed"), ("error", "errors"), ("skipped", "skipped"),
                       ("xfailed", "xfailed"), ("xpassed", "xpassed"), ("network", "needs the Hub (offline)")):
        if tp[key] or tf[key]:
            lines.append(f"| {label} | {tp[key]} | {tf[key]} |")
    lines.append(f"| total | {len(plain)} | {len(fused)} |")

    ran = {k: t for k, t in fused.items() if not t["network"]}
    reached = sum(t["kernel_calls"] > 0 for t in ran.values())
    calls = sum(t["kernel_calls"] for t in ran.values())
    fused_any = sum(t["fused_layers"] > 0 for t in ran.values())
    backends = Counter()
    for t in ran.values():
        backends.update(t.get("backends", {}))
    on = ", ".join(f"{n} on {b}" for b, n in backends.most_common())
    lines += ["", f"Tests that reached our kernels: **{reached}** of {len(ran)} ({calls} kernel calls: {on}); "
                  f"tests with at least one fused layer: {fused_any}."]

    for what, key in (("LoRA layers fuse_peft_model left on PEFT's path", "skipped_layers"),
                      ("Calls a fused layer handed to PEFT's forward", "fallback_calls")):
        tests_per, total = Counter(), Counter()
        for t in ran.values():
            for kind, n in t[key].items():
                tests_per[kind] += 1
                total[kind] += n
        lines += ["", f"| {what} | tests | {'layers' if key == 'skipped_layers' else 'calls'} |", "|---|---:|---:|"]
        lines += [f"| {kind} | {n} | {total[kind]} |" for kind, n in tests_per.most_common()]

    only_fused = sorted(k for k, t in fused.items()
                        if t["outcome"] in FAILED and not t["network"] and plain.get(k, {}).get("outcome") == "passed")
    only_plain = sorted(k for k, t in plain.items()
                        if t["outcome"] in FAILED and not t["network"] and fused.get(k, {}).get("outcome") == "passed")
    lines += ["", f"Failing only when fused: {len(only_fused)}"]
    lines += [f"- `{k.split('::', 1)[1]}`: {fused[k]['message'].splitlines()[0] if fused[k]['message'] else ''}"
              for k in only_fused]
    lines += ["", f"Failing only on PEFT's own forward: {len(only_plain)}"]
    lines += [f"- `{k.split('::', 1)[1]}`" for k in only_plain]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


def _error(cmd: str, msg: str) -> int:
    print(f"peft_suite {cmd}: error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="peft_suite", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract", help="copy tests/ of a local PEFT git clone to DEST (outside this repository)")
    e.add_argument("--git-dir", required=True, help="a PEFT clone's git directory")
    e.add_argument("--rev", default="HEAD", help="tag or commit matching the installed peft")
    e.add_argument("--dest", required=True)
    r = sub.add_parser("run", help="run PEFT's test_custom_models.py plain and/or fused")
    r.add_argument("--peft-tests", required=True, help="the folder `extract` wrote")
    r.add_argument("--out", required=True, help="where plain.json, fused.json and the logs go")
    r.add_argument("--mode", choices=("plain", "fused", "both"), default="both")
    r.add_argument("--select", choices=("lora", "all"), default="lora",
                   help="lora (default): of the classes run once per PEFT method, only the LoraConfig cases")
    r.add_argument("--backend", help="LORA_KERNELS_BACKEND for the runs (default: auto, the torch backend on CPU)")
    r.add_argument("--extra-path", action="append", default=[],
                   help="a folder to put on PYTHONPATH (e.g. where diffusers was installed with pip --target)")
    r.add_argument("pytest_args", nargs="*", help="more pytest arguments, after --")
    c = sub.add_parser("compare", help="tabulate plain.json against fused.json")
    c.add_argument("--out", required=True)
    c.add_argument("--markdown", help="also write the table to this file")
    args = p.parse_args(argv)
    return {"extract": extract, "run": run, "compare": compare}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
