"""pytest plugin for running PEFT's own test suite against lora_kernels (see README.md here).

Load it with `-p lk_peft_plugin` (this folder on PYTHONPATH). It records every test's outcome in a JSON file
(`--lk-report`); with `--lk-fuse` it also passes every PEFT model the tests build through
`lora_kernels.integrations.peft.fuse_peft_model` and records, per test, how many calls reached our kernels, which
LoRA layers fuse_peft_model left on PEFT's path (and why), and why fused layers ran PEFT's forward for a call.

Every way PEFT builds LoRA layers (get_peft_model, PeftModel.from_pretrained, add_adapter, load_adapter,
inject_adapter_in_model, LoraModel(...)) goes through BaseTuner.inject_adapter(model, adapter_name, ...), so that
one method is wrapped: after PEFT injects, the model it injected into is fused.
"""
from __future__ import annotations

import functools
import json
import re
from collections import Counter

import pytest

# Test classes of tests/test_custom_models.py parametrized over every PEFT method: `--lk-select lora` keeps only
# their LoraConfig cases (the other methods never build a LoRA layer, so fusing cannot change them).
_PER_METHOD_CLASSES = ("::TestPeftCustomModel::", "::TestPeftFsdpStateDict::", "::TestMultipleActiveAdapters::")

# A failure whose traceback names one of these needed the Hugging Face Hub (the runs are offline).
_NETWORK_MARKERS = ("OfflineModeIsEnabled", "LocalEntryNotFoundError", "offline mode is enabled",
                    "We couldn't connect to", "Cannot find the requested files in the local cache",
                    "outgoing traffic has been disabled", "HF_HUB_OFFLINE")


def pytest_addoption(parser):
    group = parser.getgroup("lora_kernels")
    group.addoption("--lk-fuse", action="store_true",
                    help="pass every PEFT model built by the tests through lora_kernels' fuse_peft_model")
    group.addoption("--lk-report", metavar="PATH", help="write per-test results as JSON to PATH")
    group.addoption("--lk-select", choices=("all", "lora"), default="all",
                    help="lora: of the classes parametrized over every PEFT method, run only the LoraConfig cases")


def reason_kind(reason: str) -> str:
    """A skip or fallback reason without the adapter and layer names in it, so that equal causes count together."""
    reason = re.sub(r"\[[^\]]*\]", "[...]", reason)
    reason = re.sub(r"'[^']*'", "'...'", reason)
    return re.sub(r"\b\d+\b", "N", reason)


class _Recorder:
    def __init__(self):
        self.tests = {}
        self.current = None

    def test(self, nodeid):
        return self.tests.setdefault(nodeid, {"outcome": None, "kernel_calls": 0, "fused_layers": 0,
                                              "skipped_layers": Counter(), "fallback_calls": Counter(), "backends": Counter(),
                                              "network": False, "message": ""})

    def here(self):
        return self.test(self.current) if self.current is not None else None


_rec = _Recorder()


def _install_fusing():
    """Wrap PEFT's injection (fuse after it) and our layer's entry points (count what reaches the kernels)."""
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import BaseTuner

    from lora_kernels.backends import resolve_backend
    from lora_kernels.integrations import peft as lk_peft

    inject = BaseTuner.inject_adapter

    @functools.wraps(inject)
    def inject_then_fuse(self, model, *args, **kwargs):
        out = inject(self, model, *args, **kwargs)
        if any(isinstance(m, LoraLayer) for m in model.modules()):
            report = lk_peft.fuse_peft_model(model)
            rec = _rec.here()
            if rec is not None:
                rec["fused_layers"] += len(report.fused)
                rec["skipped_layers"].update(reason_kind(r) for r in report.skipped.values())
        return out

    BaseTuner.inject_adapter = inject_then_fuse

    def counting(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            rec = _rec.here()
            if rec is not None:
                rec["kernel_calls"] += 1
                rec["backends"][resolve_backend(args[0])] += 1
            return fn(*args, **kwargs)
        return wrapper

    lk_peft.fused_lora_linear = counting(lk_peft.fused_lora_linear)
    lk_peft.fused_multi_lora_linear = counting(lk_peft.fused_multi_lora_linear)

    # A fused layer that cannot serve a call runs super().forward, i.e. PeftLoraLinear.forward: record why.
    peft_forward = PeftLoraLinear.forward

    @functools.wraps(peft_forward)
    def peft_forward_noting_fallback(self, x, *args, **kwargs):
        rec = _rec.here()
        if rec is not None and isinstance(self, lk_peft.FusedPeftLinear):
            if args or kwargs:
                why = "call passes " + ", ".join(sorted(kwargs)) if kwargs else "call passes positional arguments"
            elif self.disable_adapters:
                why = "adapters disabled"
            elif self.merged:
                why = "adapter merged"
            else:
                why = lk_peft._call_plan(self, x)[1] or "unknown"
            rec["fallback_calls"][reason_kind(why)] += 1
        return peft_forward(self, x, *args, **kwargs)

    PeftLoraLinear.forward = peft_forward_noting_fallback


def pytest_configure(config):
    if config.getoption("--lk-fuse"):
        _install_fusing()


def pytest_collection_modifyitems(config, items):
    if config.getoption("--lk-select") != "lora":
        return
    keep, drop = [], []
    for item in items:
        per_method = any(c in item.nodeid for c in _PER_METHOD_CLASSES)
        (keep if not per_method or "-LoraConfig-" in item.nodeid else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _rec.current = item.nodeid
    _rec.test(item.nodeid)
    yield
    _rec.current = None


def pytest_runtest_logreport(report):
    rec = _rec.test(report.nodeid)
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
    elif report.failed:
        outcome = "failed" if report.when == "call" else "error"
    else:
        outcome = report.outcome
    # The first non-passed phase decides (a teardown error after a failure keeps "failed").
    if rec["outcome"] in (None, "passed"):
        rec["outcome"] = outcome
    if report.failed:
        text = str(report.longrepr)
        rec["network"] = rec["network"] or any(m in text for m in _NETWORK_MARKERS)
        crash = getattr(report.longrepr, "reprcrash", None)
        rec["message"] = (crash.message if crash is not None else text)[:400]


def pytest_sessionfinish(session):
    path = session.config.getoption("--lk-report")
    if not path:
        return
    with open(path, "w") as f:
        json.dump({"fused": bool(session.config.getoption("--lk-fuse")), "tests": _rec.tests}, f, indent=0)
