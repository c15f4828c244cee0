"""Turn a results file into a Markdown table and a PNG chart (speedup vs shape) next to it.

    python -m bench.report bench/results/<gpu>-<date>.json          # writes <gpu>-<date>.md and .png
    python -m bench.report RESULTS.json --no-png                     # without matplotlib

The "Targets" section compares the measured ratios with the targets; every number in the
report comes from the JSON, nothing else. The chart shows, per case, how much faster ours (Triton)
is than PEFT and than the plain unfused torch LoRA, and its speed relative to the bare base linear
(1.0 = as fast as the frozen base GEMMs alone).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from bench.lkbench.results import load

# The targets (H100, bf16): fused/base at M=8192, r=16 on these (K, N); PEFT/fused by dropout.
TARGET_SHAPES = {(4096, 4096), (4096, 14336), (14336, 4096)}
FUSED_OVER_BASE_MAX = 1.10
PEFT_OVER_FUSED_MIN = {0.1: 1.5, 0.0: 1.3}
E2E_TOKENS_MIN, E2E_PEAK_MAX = 1.25, 0.8
# DoRA (issue 24), on the headline cases with fp32 adapters, by dropout.
DORA_OVER_LORA_MAX = {0.0: 1.25, 0.1: 1.6}
PEFT_DORA_OVER_DORA_MIN = {0.0: 1.5, 0.1: 1.8}
DORA_SAVED_MAX = 0.6
# MoE experts (issue 25): Qwen3-30B-A3B and gpt-oss-20b layers, 4096 tokens, r=16, bf16, fp32 adapters.
MOE_HEADLINE = {"qwen3-30b-a3b", "gpt-oss-20b"}
MOE_OVER_BASE_MAX = {0.0: 1.15, 0.1: 1.25}
MOE_PEFT_OVER_OURS_MIN, MOE_PEAK_MAX = 2.0, 0.5
# Chart: the headline cases when the file has them, otherwise every case (see --chart-match).
DEFAULT_CHART_MATCH = r"/M8192/r16/p0\.1/bf16/"


def _f(v, digits=3):
    return "—" if v is None else f"{v:.{digits}f}"


def _ratio(c, key):
    return (c.get("ratios") or {}).get(key)


def _headline(c):
    return (c["K"], c["N"]) in TARGET_SHAPES and c["M"] == 8192 and c["r"] == 16 and c["dtype"] == "bf16"


def _moe_headline(c):
    return c["shape"] in MOE_HEADLINE and c["T"] == 4096 and c["r"] == 16 and c["dtype"] == "bf16" \
        and c["adapter_dtype"] == "fp32"


def _row(target: str, c: dict, key: str, met):
    v = _ratio(c, key)
    return target, c["name"], v, None if v is None else met(v)


def targets(doc) -> list:
    """Rows (target, case, measured, verdict) for every case in the file that a target speaks about."""
    rows = []
    for c in doc["cases"]:
        if not _headline(c):
            continue
        fb = _ratio(c, "fused_over_base")
        if c["dropout"] == 0.1:
            rows.append((f"fused/base ≤ {FUSED_OVER_BASE_MAX}", c["name"], fb,
                         None if fb is None else fb <= FUSED_OVER_BASE_MAX))
        need = PEFT_OVER_FUSED_MIN.get(c["dropout"])
        pf = _ratio(c, "peft_over_fused")
        if need is not None:
            rows.append((f"PEFT/fused ≥ {need}", c["name"], pf, None if pf is None else pf >= need))
    for c in doc.get("dora", []):
        if not (_headline(c) and c["adapter_dtype"] == "fp32"):
            continue
        p = c["dropout"]
        rows.append(_row(f"DoRA/LoRA ≤ {DORA_OVER_LORA_MAX[p]} (p={p:g})", c, "dora_over_lora",
                         lambda v: v <= DORA_OVER_LORA_MAX[p]))
        rows.append(_row(f"PEFT DoRA/ours ≥ {PEFT_DORA_OVER_DORA_MIN[p]} (p={p:g})", c, "peft_dora_over_dora",
                         lambda v: v >= PEFT_DORA_OVER_DORA_MIN[p]))
        rows.append(_row(f"saved activations DoRA/PEFT DoRA ≤ {DORA_SAVED_MAX}", c, "dora_saved_over_peft_dora",
                         lambda v: v <= DORA_SAVED_MAX))
    for c in doc.get("moe", []):
        if not _moe_headline(c):
            continue
        p = c["dropout"]
        rows.append(_row(f"MoE ours/base ≤ {MOE_OVER_BASE_MAX[p]} (p={p:g})", c, "ours_over_base",
                         lambda v: v <= MOE_OVER_BASE_MAX[p]))
        if p == 0:
            rows.append(_row(f"MoE PEFT/ours ≥ {MOE_PEFT_OVER_OURS_MIN}", c, "peft_over_ours",
                             lambda v: v >= MOE_PEFT_OVER_OURS_MIN))
            rows.append(_row(f"MoE peak memory ours/PEFT ≤ {MOE_PEAK_MAX}", c, "ours_peak_over_peft",
                             lambda v: v <= MOE_PEAK_MAX))
    for e in doc.get("e2e", []):
        r = e.get("ratios") or {}
        tok, mem = r.get("tokens_per_s_fused_over_peft"), r.get("peak_mb_fused_over_peft")
        rows.append((f"tokens/s ours/PEFT ≥ {E2E_TOKENS_MIN}", e["name"], tok, None if tok is None else tok >= E2E_TOKENS_MIN))
        rows.append((f"peak memory ours/PEFT ≤ {E2E_PEAK_MAX}", e["name"], mem, None if mem is None else mem <= E2E_PEAK_MAX))
    return rows


def markdown(doc, png_name=None) -> str:
    out = []
    if doc.get("smoke"):
        out += ["> **Smoke run** (tiny shapes or no GPU): it shows that the code runs; its numbers are not results.", ""]
    dirty = " (with uncommitted changes)" if doc.get("dirty") else ""
    out += [f"# lora_kernels benchmarks — {doc['device']}", "",
            f"torch {doc['torch']}, triton {doc['triton']}, CUDA {doc.get('cuda')}, transformers "
            f"{doc.get('transformers')}, peft {doc.get('peft')}; commit `{doc['commit']}`{dirty}; {doc['date']}.", ""]
    t = doc.get("timing", {})
    out += [f"Timing: {t.get('method')}, {t.get('warmup')} warm-up + {t.get('reps')} timed repetitions, "
            f"{t.get('statistic')}, L2 flushed ({t.get('l2_flush_bytes', 0) // 2**20} MiB written) before each. "
            "All implementations of a case ran back to back in one process on the same tensors. "
            "`ms` = forward + backward (W frozen; gradients of x, A and B).", ""]
    if doc.get("truncated"):
        out += [f"The run stopped at its time budget: {len(doc['truncated']['not_run'])} case(s) of grid "
                f"`{doc['truncated']['grid']}` not measured.", ""]
    rows = [] if doc.get("smoke") else targets(doc)  # a smoke run's numbers are no evidence either way
    if rows:
        out += ["## Targets", "", "| target | case | measured | met |", "|---|---|---|---|"]
        for name, case, v, ok in rows:
            out.append(f"| {name} | `{case}` | {_f(v)} | {'—' if ok is None else ('yes' if ok else 'no')} |")
        out.append("")
    if png_name:
        out += [f"![speedup vs shape]({png_name})", ""]
    if doc["cases"]:
        out += ["## Op level: forward + backward", "",
                "| case | M | K→N | r | p | dtype | A | base ms | fused ms | fused/base | PEFT ms | PEFT/fused "
                "| torch ms | torch/fused | ours_torch/fused |",
                "|---|---:|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in doc["cases"]:
            out.append(f"| `{c['shape']}` | {c['M']} | {c['K']}→{c['N']} | {c['r']} | {c['dropout']:g} | {c['dtype']} "
                       f"| {c['adapter_dtype']} | {_f(c.get('base_ms'))} | {_f(c.get('fused_ms'))} "
                       f"| {_f(_ratio(c, 'fused_over_base'))} | {_f(c.get('peft_ms'))} | {_f(_ratio(c, 'peft_over_fused'))} "
                       f"| {_f(c.get('torch_ms'))} | {_f(_ratio(c, 'torch_over_fused'))} "
                       f"| {_f(_ratio(c, 'ours_torch_over_fused'))} |")
        out += ["", "## Base GEMM: Triton (fused) or cuBLAS (split), forward + backward", "",
                "`fused` runs with `LORA_KERNELS_GEMM=auto`, which times both paths per pass on first use and "
                "keeps the faster; the last columns say what it chose (— where it did not measure, e.g. off "
                "CUDA). `hybrid` is the bench-only variant with the LoRA term as cuBLAS's C operand.", "",
                "| case | fused_gemm ms | split_gemm ms | split/fused_gemm | hybrid ms | auto (fused) ms "
                "| auto fwd | auto bwd |", "|---|---:|---:|---:|---:|---:|---|---|"]
        for c in doc["cases"]:
            gemm = (c.get("impls", {}).get("fused") or {}).get("gemm") or {}
            pick = lambda p: ("—" if p not in gemm else  # noqa: E731
                              f"{gemm[p]['path']} ({_f(gemm[p].get('fused_ms'))} / {_f(gemm[p].get('split_ms'))})")
            out.append(f"| `{c['name']}` | {_f(c.get('fused_gemm_ms'))} | {_f(c.get('split_gemm_ms'))} "
                       f"| {_f(_ratio(c, 'split_gemm_over_fused_gemm'))} | {_f(c.get('hybrid_ms'))} "
                       f"| {_f(c.get('fused_ms'))} | {pick('fwd')} | {pick('bwd')} |")
        out += ["", "auto fwd / bwd: the path taken, then the fused / split medians (ms) it measured for that pass."]
        out += ["", "## Op level: forward and backward separately (ms)", "",
                "| case | fused fwd | fused bwd | base fwd | base bwd | PEFT fwd | PEFT bwd | hybrid fwd | hybrid bwd |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in doc["cases"]:
            i = c.get("impls", {})
            g = lambda n, k: _f(i.get(n, {}).get(k))  # noqa: E731
            out.append(f"| `{c['name']}` | {g('fused', 'fwd_ms')} | {g('fused', 'bwd_ms')} | {g('base', 'fwd_ms')} "
                       f"| {g('base', 'bwd_ms')} | {g('peft', 'fwd_ms')} | {g('peft', 'bwd_ms')} "
                       f"| {g('hybrid', 'fwd_ms')} | {g('hybrid', 'bwd_ms')} |")
        out += ["", "## Op level: memory (MiB)", "",
                "Peak = CUDA memory allocated during one forward+backward above what was allocated before it; "
                "saved = storages autograd keeps for backward, parameters excluded.", "",
                "| case | base peak | fused peak | PEFT peak | torch peak | fused saved | PEFT saved | torch saved |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for c in doc["cases"]:
            out.append(f"| `{c['name']}` | {_f(c.get('base_peak_mb'), 1)} | {_f(c.get('fused_peak_mb'), 1)} "
                       f"| {_f(c.get('peft_peak_mb'), 1)} | {_f(c.get('torch_peak_mb'), 1)} "
                       f"| {_f(c.get('fused_saved_mb'), 1)} | {_f(c.get('peft_saved_mb'), 1)} "
                       f"| {_f(c.get('torch_saved_mb'), 1)} |")
        skipped = sorted({f"{n}: {d['skipped']}" for c in doc["cases"] for n, d in c.get("impls", {}).items()
                          if "skipped" in d})
        if skipped:
            out += ["", "Not measured on this machine:", ""] + [f"- {s}" for s in skipped]
        out.append("")
    out += _dora_tables(doc.get("dora", [])) + _moe_tables(doc.get("moe", []))
    if doc.get("e2e"):
        out += ["## End to end: one training step (forward, backward, AdamW)", "",
                "| model | tokens/step | PEFT tokens/s | ours tokens/s | ours/PEFT | PEFT peak MiB | ours peak MiB "
                "| ours/PEFT peak |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for e in doc["e2e"]:
            p, o, r = e["impls"].get("peft") or {}, e["impls"].get("fused") or {}, e.get("ratios") or {}
            cfg = e["config"]
            desc = (f"`{e['name']}`: hidden {cfg['hidden']}, MLP {cfg['intermediate']}, {cfg['layers']} layers, "
                    f"seq {cfg['seq']}×{cfg['batch']}, {cfg['dtype']}, r {cfg['r']}, p {cfg['dropout']}")
            out.append(f"| {desc} | {e['tokens_per_step']} | {_f(p.get('tokens_per_s'), 0)} "
                       f"| {_f(o.get('tokens_per_s'), 0)} | {_f(r.get('tokens_per_s_fused_over_peft'))} "
                       f"| {_f(p.get('peak_mb'), 0)} | {_f(o.get('peak_mb'), 0)} | {_f(r.get('peak_mb_fused_over_peft'))} |")
        out.append("")
    return "\n".join(out)


def _skipped(cases) -> list:
    reasons = sorted({f"{n}: {d['skipped']}" for c in cases for n, d in c.get("impls", {}).items() if "skipped" in d})
    return ["", "Not measured:", ""] + [f"- {s}" for s in reasons] if reasons else []


def _dora_tables(cases) -> list:
    if not cases:
        return []
    out = ["## DoRA: forward + backward", "",
           "Base linear, our LoRA (`fused`), our DoRA (Triton; torch backend beside it) and PEFT's DoRA Linear on the "
           "same W, A, B and magnitude. Targets on an H100/H200 (headline cases): DoRA/LoRA ≤ "
           f"{DORA_OVER_LORA_MAX[0.0]} at p = 0 and ≤ {DORA_OVER_LORA_MAX[0.1]} at p = 0.1; PEFT DoRA/ours ≥ "
           f"{PEFT_DORA_OVER_DORA_MIN[0.0]} at p = 0 and ≥ {PEFT_DORA_OVER_DORA_MIN[0.1]} at p = 0.1; saved "
           f"activations DoRA/PEFT DoRA ≤ {DORA_SAVED_MAX}.", "",
           "| case | base ms | LoRA ms | DoRA ms | DoRA torch ms | PEFT DoRA ms | DoRA/LoRA | PEFT DoRA/DoRA | DoRA saved "
           "MiB | PEFT DoRA saved MiB | saved DoRA/PEFT | DoRA peak MiB | PEFT DoRA peak MiB |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cases:
        out.append(f"| `{c['name']}` | {_f(c.get('base_ms'))} | {_f(c.get('lora_ms'))} | {_f(c.get('dora_ms'))} "
                   f"| {_f(c.get('dora_torch_ms'))} | {_f(c.get('peft_dora_ms'))} | {_f(_ratio(c, 'dora_over_lora'))} "
                   f"| {_f(_ratio(c, 'peft_dora_over_dora'))} | {_f(c.get('dora_saved_mb'), 1)} "
                   f"| {_f(c.get('peft_dora_saved_mb'), 1)} | {_f(_ratio(c, 'dora_saved_over_peft_dora'))} "
                   f"| {_f(c.get('dora_peak_mb'), 1)} | {_f(c.get('peft_dora_peak_mb'), 1)} |")
    out += ["", "Forward and backward separately (ms):", "",
            "| case | LoRA fwd | LoRA bwd | DoRA fwd | DoRA bwd | PEFT DoRA fwd | PEFT DoRA bwd |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for c in cases:
        g = lambda n, k: _f(c.get("impls", {}).get(n, {}).get(k))  # noqa: E731
        out.append(f"| `{c['name']}` | {g('lora', 'fwd_ms')} | {g('lora', 'bwd_ms')} | {g('dora', 'fwd_ms')} "
                   f"| {g('dora', 'bwd_ms')} | {g('peft_dora', 'fwd_ms')} | {g('peft_dora', 'bwd_ms')} |")
    return out + _skipped(cases) + [""]


def _moe_tables(cases) -> list:
    if not cases:
        return []
    ran = sorted({f"base: {c.get('experts_implementation')}; ours: lora_kernels backend {c.get('ours_backend')}, "
                  f"autograd Functions {', '.join(c.get('ours_functions') or []) or '—'}" for c in cases})
    out = ["## MoE experts: forward + backward", "",
           "One transformers experts module on a fixed routing; gradients of the hidden states, the routing weights "
           "and the adapters. Targets on an H100/H200 (Qwen3-30B-A3B and gpt-oss-20b layers): ours/base ≤ "
           f"{MOE_OVER_BASE_MAX[0.0]} at p = 0 and ≤ {MOE_OVER_BASE_MAX[0.1]} at p = 0.1; PEFT/ours ≥ "
           f"{MOE_PEFT_OVER_OURS_MIN}; peak memory ours/PEFT ≤ {MOE_PEAK_MAX}. Ran: " + " | ".join(ran) + ".", "",
           "| case | E | top-k | H | I | base ms | ours ms | PEFT ms | ours/base | PEFT/ours | base peak MiB "
           "| ours peak MiB | PEFT peak MiB | peak ours/PEFT | ours saved MiB | PEFT saved MiB |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cases:
        out.append(f"| `{c['name']}` | {c['E']} | {c['top_k']} | {c['H']} | {c['I']} | {_f(c.get('base_ms'))} "
                   f"| {_f(c.get('ours_ms'))} | {_f(c.get('peft_ms'))} | {_f(_ratio(c, 'ours_over_base'))} "
                   f"| {_f(_ratio(c, 'peft_over_ours'))} | {_f(c.get('base_peak_mb'), 1)} "
                   f"| {_f(c.get('ours_peak_mb'), 1)} | {_f(c.get('peft_peak_mb'), 1)} "
                   f"| {_f(_ratio(c, 'ours_peak_over_peft'))} | {_f(c.get('ours_saved_mb'), 1)} "
                   f"| {_f(c.get('peft_saved_mb'), 1)} |")
    return out + _skipped(cases) + [""]


def chart(doc, path: Path, match: str) -> int:
    """Grouped bars per case; returns how many cases were drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [c for c in doc["cases"] if re.search(match, c["name"])] or doc["cases"]
    series = [("PEFT / ours", "peft_over_fused", False), ("unfused torch / ours", "torch_over_fused", False),
              ("base / ours (1 = free LoRA)", "fused_over_base", True)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(cs) + 2), 4.5))
    width = 0.8 / len(series)
    for j, (label, key, invert) in enumerate(series):
        vals = []
        for c in cs:
            v = _ratio(c, key)
            vals.append(float("nan") if v is None else (1.0 / v if invert else v))
        ax.bar([i + (j - (len(series) - 1) / 2) * width for i in range(len(cs))], vals, width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(cs)))
    ax.set_xticklabels([f"{c['K']}→{c['N']}\nM{c['M']} r{c['r']} p{c['dropout']:g}\n{c['dtype']}/A {c['adapter_dtype']}"
                        for c in cs], fontsize=8)
    ax.set_ylabel("speed ratio (higher = ours faster)")
    title = f"lora_kernels fused LoRA linear, forward+backward\n{doc['device']}, commit {str(doc['commit'])[:10]}"
    ax.set_title(title + ("\nSMOKE RUN, not a result" if doc.get("smoke") else ""), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return len(cs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--md", type=Path, default=None, help="default: the results path with .md")
    ap.add_argument("--png", type=Path, default=None, help="default: the results path with .png")
    ap.add_argument("--no-png", action="store_true", help="skip the chart (no matplotlib needed)")
    ap.add_argument("--chart-match", default=DEFAULT_CHART_MATCH,
                    help=f"regex selecting the charted cases (default {DEFAULT_CHART_MATCH!r}; all if none match)")
    ap.add_argument("--check-args", action="store_true", help="check the arguments and that the chart can be "
                    "drawn (matplotlib), then exit; the results file need not exist yet")
    args = ap.parse_args(argv)
    re.compile(args.chart_match)
    if args.check_args:
        if not args.no_png:
            import matplotlib  # noqa: F401  (ImportError here: the run would lose its chart)
        print(f"report.py --check-args: would write {args.md or args.results.with_suffix('.md')}"
              f"{'' if args.no_png else ' and ' + str(args.png or args.results.with_suffix('.png'))}")
        return 0
    doc = load(args.results)
    md_path = args.md or args.results.with_suffix(".md")
    png_path = None if args.no_png else (args.png or args.results.with_suffix(".png"))
    if png_path is not None and not doc["cases"]:
        print("report.py: no op-level cases in the file, so no chart")
        png_path = None
    if png_path is not None:
        n = chart(doc, png_path, args.chart_match)
        print(f"report.py: chart of {n} case(s) -> {png_path}")
    md_path.write_text(markdown(doc, png_path.name if png_path else None), encoding="utf-8")
    print(f"report.py: table -> {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
