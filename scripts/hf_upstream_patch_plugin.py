"""pytest plugin for ``scripts/hf_upstream_tests.py``: records every test's outcome and, when asked,
patches every Longformer / LED model the tests build.

Load it with ``-p hf_upstream_patch_plugin`` (this folder on ``PYTHONPATH``). Environment:

* ``HF_UPSTREAM_RESULTS``: where to write the JSON record (required; nothing is written without it).
* ``HF_UPSTREAM_SEED``: unless ``none``, every test starts from RNG state derived from this seed
  and its node id (``random``, numpy, torch and ``test_modeling_common.global_rng``, which HF's
  ``ids_tensor`` / ``random_attention_mask`` draw from unseeded): both runs then give each test the
  same inputs and weights (``patch`` draws no random numbers), so an input-dependent flake hits
  both runs or neither.
* ``HF_UPSTREAM_PATCH=1``: patch. ``transformers.PreTrainedModel.post_init`` (the last call of every
  Hugging Face model's ``__init__``, so also of ``from_pretrained`` / ``from_config``) is wrapped so that
  afterwards ``longformer_ext.integrations.transformers.patch(model)`` is applied to every model
  holding a ``LongformerModel`` or an ``LEDEncoder``. ``patch`` is idempotent, so a task head patched
  once as its inner ``LongformerModel`` / ``LEDModel`` is built and again at its own ``post_init`` is
  fine. A model holding neither (``LEDDecoder`` alone, other architectures) makes ``patch`` raise
  ``TypeError``: it is counted and left as it is. Any other exception from ``patch`` propagates, so the
  test that built the model fails.

The record holds, per test node id, the outcome (passed / failed / error / skipped / xfailed /
xpassed), the phase that decided it, a one-line reason, whether pytest-timeout fired, and how many
models were patched while it ran; plus the totals of patched models (by class) for the session. A
patching session that patched nothing exits with status 3 and says so on stderr.
"""

import collections
import json
import os
import sys
import time
import zlib

_STATE = {
    "patch": os.environ.get("HF_UPSTREAM_PATCH") == "1",
    "patched_calls": 0,  # successful patch() calls (inner models count too)
    "patched_by_class": collections.Counter(),
    "skipped_no_target": collections.Counter(),  # models holding no LongformerModel / LEDEncoder
    "current": None,  # node id of the running test
    "tests": {},
    "collect_errors": {},
    "started": time.time(),
}


def _install_patching():
    import transformers
    from longformer_ext.integrations.transformers import HFLongformerSelfAttention, patch

    original = transformers.PreTrainedModel.post_init
    if getattr(original, "_hf_upstream_wrapped", False):
        return

    def post_init(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        try:
            patch(self)
        except TypeError as exc:
            if "found no LongformerModel or LEDEncoder" not in str(exc):
                raise
            _STATE["skipped_no_target"][type(self).__name__] += 1
            return result
        # patch() returned: make sure it really replaced the attention cores.
        if not any(isinstance(m, HFLongformerSelfAttention) for m in self.modules()):
            raise AssertionError(f"hf_upstream_patch_plugin: patch({type(self).__name__}) returned but no "
                                 "HFLongformerSelfAttention is in the model")
        _STATE["patched_calls"] += 1
        _STATE["patched_by_class"][type(self).__name__] += 1
        current = _STATE["tests"].get(_STATE["current"])
        if current is not None:
            current["patched_models"] += 1
        return result

    post_init._hf_upstream_wrapped = True
    post_init.__wrapped__ = original
    transformers.PreTrainedModel.post_init = post_init


def pytest_configure(config):
    if _STATE["patch"]:
        _install_patching()


def _entry(nodeid):
    return _STATE["tests"].setdefault(nodeid, {"outcome": None, "phase": None, "reason": "", "timeout": False,
                                               "patched_models": 0, "duration_s": 0.0})


def pytest_runtest_setup(item):
    seed = os.environ.get("HF_UPSTREAM_SEED", "0")
    if seed.lower() == "none":
        return
    value = (zlib.crc32(item.nodeid.encode()) ^ int(seed)) & 0x7FFFFFFF
    import random

    random.seed(value)
    try:
        import numpy

        numpy.random.seed(value)
    except ImportError:
        pass
    try:
        import torch

        torch.manual_seed(value)
    except ImportError:
        pass
    for name, module in list(sys.modules.items()):
        if name.endswith("test_modeling_common") and isinstance(getattr(module, "global_rng", None), random.Random):
            module.global_rng.seed(value)


def pytest_runtest_logstart(nodeid, location):
    _entry(nodeid)
    _STATE["current"] = nodeid


def _one_line(report) -> str:
    longrepr = report.longrepr
    if longrepr is None:
        return ""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # skip: (path, line, reason)
        return str(longrepr[2])
    crash = getattr(getattr(longrepr, "reprcrash", None), "message", None)
    text = crash if crash else str(longrepr)
    return " ".join(text.split())[:500]


def pytest_runtest_logreport(report):
    entry = _entry(report.nodeid)
    entry["duration_s"] += float(getattr(report, "duration", 0.0) or 0.0)
    text = str(report.longrepr) if report.longrepr is not None else ""
    if "Timeout (" in text or "Timeout >" in text or "+++ Timeout +++" in text:
        entry["timeout"] = True
    wasxfail = hasattr(report, "wasxfail")
    if report.when == "call":
        if wasxfail:
            outcome = "xfailed" if report.skipped else "xpassed"
        else:
            outcome = report.outcome  # passed / failed / skipped
        if entry["outcome"] != "error":
            entry.update(outcome=outcome, phase="call", reason=_one_line(report) if outcome != "passed" else "")
    elif report.failed:  # setup / teardown error
        if entry["outcome"] != "failed":
            entry.update(outcome="error", phase=report.when, reason=_one_line(report))
    elif report.skipped and report.when == "setup":
        entry.update(outcome="xfailed" if wasxfail else "skipped", phase="setup", reason=_one_line(report))


def pytest_collectreport(report):
    if report.failed:
        _STATE["collect_errors"][report.nodeid] = _one_line(report)


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("HF_UPSTREAM_RESULTS")
    nothing_patched = _STATE["patch"] and _STATE["patched_calls"] == 0
    record = {
        "patch": _STATE["patch"],
        "patched_calls": _STATE["patched_calls"],
        "patched_by_class": dict(_STATE["patched_by_class"]),
        "skipped_no_target": dict(_STATE["skipped_no_target"]),
        "collect_errors": _STATE["collect_errors"],
        "exitstatus": int(exitstatus),
        "duration_s": time.time() - _STATE["started"],
        "tests": _STATE["tests"],
    }
    if path:
        with open(path, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
    if nothing_patched and _STATE["tests"]:
        sys.stderr.write("\nhf_upstream_patch_plugin: HF_UPSTREAM_PATCH=1 but NO model was patched: the patched "
                         "run tested nothing of longformer_ext\n")
        session.exitstatus = 3
