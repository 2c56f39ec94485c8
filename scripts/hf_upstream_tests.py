#!/usr/bin/env python
"""Runs transformers' own Longformer and LED model tests unpatched and patched, and compares.

The bar for the Hugging Face drop-in: transformers' own Longformer and LED model tests, run with
every model they build patched, pass wherever they pass unpatched. This script runs Hugging Face's
``tests/models/longformer`` and ``tests/models/led`` with pytest twice, each in its own subprocess:

* unpatched: transformers as installed;
* patched: with ``scripts/hf_upstream_patch_plugin.py``, which applies
  ``longformer_ext.integrations.transformers.patch`` to every Longformer / LED model the tests build
  (by wrapping ``PreTrainedModel.post_init``) and counts them.

Both runs load the same plugin, which records each test's outcome to JSON (only the patched run
patches). The script then prints a table (passed both / failed both / skipped both / passed unpatched but
FAILED (or skipped) patched / failed unpatched but passed patched / ...), lists the regressions with their reasons, and
exits 1 if any test passes unpatched and fails patched, 2 if a run produced no record or the
patched run patched no model. HF's tests draw random inputs unseeded; the plugin seeds each test
from ``--seed`` and its node id, identically in both runs, so an input-dependent flake shows in both
runs or neither. Each patched-only failure is rerun ``--confirm`` times in both modes (with the same
seeds) and reported as flaky if it does not reproduce.

``--tests`` is a folder holding Hugging Face's ``tests/`` package (``tests/__init__.py``,
``test_modeling_common.py``, ``models/longformer``, ``models/led``, ...) from a transformers checkout
matching the installed release; pytest runs from its parent (the checkout root), so the checkout's
``conftest.py`` / ``pytest.ini`` apply. Nothing is downloaded: the runs set ``HF_HUB_OFFLINE=1``, so
tests that need the Hub fail (or skip) the same way in both runs.

Example::

    PYTHONPATH=python python scripts/hf_upstream_tests.py --tests /tmp/hf-tests/tests
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGIN = "hf_upstream_patch_plugin"
SUITES = ("models/longformer", "models/led")
PASS = {"passed", "xpassed"}
FAIL = {"failed", "error"}
SKIP = {"skipped", "xfailed"}


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", required=True,
                        help="folder holding Hugging Face's tests/ (of the installed transformers release)")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression (both runs)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="per-test timeout in seconds (pytest-timeout; 0 = none; default 600)")
    parser.add_argument("--confirm", type=int, default=1,
                        help="rerun each test that passed unpatched and failed patched this many times in both "
                             "modes; it counts as a regression only if it fails patched every time and passes "
                             "unpatched every time (default 1; 0 = no reruns)")
    parser.add_argument("--seed", default="0",
                        help="seed every test's RNGs from this and its node id, the same in both runs, so both "
                             "runs draw the same random inputs and weights ('none': leave HF's tests unseeded; "
                             "default 0)")
    parser.add_argument("--only", choices=("both", "unpatched", "patched"), default="both",
                        help="run one mode only (no comparison; for debugging)")
    parser.add_argument("--out", default=None, help="folder for the JSON records and pytest logs "
                                                    "(default: a new temporary folder, kept)")
    parser.add_argument("--json", dest="summary_json", default=None,
                        help="also write the comparison (lists of node ids per category) to this file")
    parser.add_argument("pytest_args", nargs="*", help="extra arguments for pytest (after --)")
    return parser.parse_args(argv)


def _run(mode, args, out_dir, node_ids=None, tag=""):
    """One pytest subprocess; returns (record dict or None, seconds, log path)."""
    tests = os.path.abspath(args.tests)
    root = os.path.dirname(tests)
    name = f"{mode}{tag}"
    results = os.path.join(out_dir, f"{name}.json")
    log = os.path.join(out_dir, f"{name}.log")
    if os.path.exists(results):
        os.remove(results)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["HF_UPSTREAM_RESULTS"] = results
    env["HF_UPSTREAM_PATCH"] = "1" if mode == "patched" else "0"
    env["HF_UPSTREAM_SEED"] = str(args.seed)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    cmd = [sys.executable, "-m", "pytest", "-p", PLUGIN, "-q", "-rN", "-p", "no:cacheprovider", "--rootdir", root]
    if args.timeout and args.timeout > 0:
        cmd += [f"--timeout={args.timeout:g}"]
    if node_ids:
        cmd += list(node_ids)
    else:
        cmd += [os.path.join(tests, suite) for suite in SUITES]
        if args.keyword:
            cmd += ["-k", args.keyword]
    cmd += list(args.pytest_args)
    start = time.time()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.time() - start
    record = None
    if os.path.exists(results):
        with open(results) as f:
            record = json.load(f)
        record["returncode"] = proc.returncode
    return record, seconds, log


def _outcomes(record):
    outcomes = {nodeid: entry["outcome"] or "error" for nodeid, entry in record["tests"].items()}
    for nodeid in record.get("collect_errors", {}):
        outcomes[nodeid] = "error"
    return outcomes


def _compare(unpatched, patched):
    """Node ids by category. A test that passes unpatched and fails, errors or skips patched is a
    regression (the criterion is "passes patched wherever it passes unpatched")."""
    a, b = _outcomes(unpatched), _outcomes(patched)
    cats = {"passed both": [], "failed both": [], "skipped both": [],
            "passed unpatched, FAILED patched": [], "failed unpatched, passed patched": [],
            "skipped unpatched only": [], "failed unpatched, skipped patched": [], "only in one run": []}
    for nodeid in sorted(set(a) | set(b)):
        x, y = a.get(nodeid), b.get(nodeid)
        if x is None or y is None:
            cats["only in one run"].append(nodeid)
        elif x in SKIP and y in SKIP:
            cats["skipped both"].append(nodeid)
        elif x in PASS and y in PASS:
            cats["passed both"].append(nodeid)
        elif x in FAIL and y in FAIL:
            cats["failed both"].append(nodeid)
        elif x in PASS:  # y failed, errored or skipped
            cats["passed unpatched, FAILED patched"].append(nodeid)
        elif x in SKIP:
            cats["skipped unpatched only"].append(nodeid)
        elif y in PASS:
            cats["failed unpatched, passed patched"].append(nodeid)
        else:
            cats["failed unpatched, skipped patched"].append(nodeid)
    return cats


def _short(nodeid):
    parts = nodeid.split("::")
    return "::".join(parts[-2:]) if len(parts) >= 2 else nodeid


def _reason(record, nodeid):
    entry = record["tests"].get(nodeid) or {}
    text = entry.get("reason") or record.get("collect_errors", {}).get(nodeid, "")
    if entry.get("timeout"):
        text = "[timeout] " + text
    return text


def _print_table(cats, unpatched, patched):
    width = max(len(k) for k in cats)
    print("\n== transformers upstream Longformer / LED tests: unpatched vs patched ==")
    for key, ids in cats.items():
        print(f"  {key:<{width}}  {len(ids):5d}")
    print(f"  {'total':<{width}}  {sum(len(v) for v in cats.values()):5d}")
    for key in ("skipped unpatched only", "failed unpatched, skipped patched", "only in one run"):
        if cats[key]:
            print(f"  {key}: " + ", ".join(_short(n) for n in cats[key][:20]))
    print(f"\npatched run: {patched['patched_calls']} patch() calls; by class: "
          + ", ".join(f"{k} {v}" for k, v in sorted(patched["patched_by_class"].items())))
    if patched.get("skipped_no_target"):
        print("  left unpatched (hold no LongformerModel / LEDEncoder): "
              + ", ".join(f"{k} {v}" for k, v in sorted(patched["skipped_no_target"].items())))
    exercised = sum(1 for n in cats["passed both"] if patched["tests"].get(n, {}).get("patched_models", 0) > 0)
    print(f"  {exercised} of the {len(cats['passed both'])} tests passing in both runs built a patched model")


def main(argv=None):
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    tests = os.path.abspath(args.tests)
    missing = [s for s in SUITES if not os.path.isdir(os.path.join(tests, s))]
    if missing or not os.path.isfile(os.path.join(tests, "test_modeling_common.py")):
        print(f"error: {tests} is not Hugging Face's tests/ folder (needs test_modeling_common.py and "
              f"{', '.join(SUITES)})", file=sys.stderr)
        return 2
    if args.timeout and args.timeout > 0:
        try:
            import pytest_timeout  # noqa: F401
        except ImportError:
            print("warning: pytest-timeout is not installed; running without a per-test timeout "
                  "(pip install pytest-timeout)", file=sys.stderr)
            args.timeout = 0
    out_dir = os.path.abspath(args.out) if args.out else tempfile.mkdtemp(prefix="hf-upstream-")
    os.makedirs(out_dir, exist_ok=True)
    print(f"records and logs: {out_dir}")

    modes = ("unpatched", "patched") if args.only == "both" else (args.only,)
    records = {}
    for mode in modes:
        print(f"running {mode} ...", flush=True)
        record, seconds, log = _run(mode, args, out_dir)
        if record is None:
            print(f"error: the {mode} run wrote no record (see {log})", file=sys.stderr)
            return 2
        counts = {}
        for outcome in _outcomes(record).values():
            counts[outcome] = counts.get(outcome, 0) + 1
        print(f"  {mode}: {seconds:.0f} s, pytest exit {record['returncode']}, "
              + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f"  (log: {log})", flush=True)
        records[mode] = record
    if "patched" in records and records["patched"]["patched_calls"] == 0:
        print("error: the patched run patched NO model; nothing of longformer_ext was tested", file=sys.stderr)
        return 2
    if args.only != "both":
        return 0

    unpatched, patched = records["unpatched"], records["patched"]
    cats = _compare(unpatched, patched)
    regressions = cats["passed unpatched, FAILED patched"]
    flaky = []
    if regressions and args.confirm > 0:
        print(f"confirming {len(regressions)} patched-only failure(s) with {args.confirm} rerun(s) per mode ...",
              flush=True)
        confirmed = list(regressions)
        for i in range(args.confirm):
            for mode in ("unpatched", "patched"):
                record, _, log = _run(mode, args, out_dir, node_ids=confirmed, tag=f"-confirm{i + 1}")
                if record is None:
                    print(f"error: a confirmation run wrote no record (see {log})", file=sys.stderr)
                    return 2
                outcomes = _outcomes(record)
                good = PASS if mode == "unpatched" else FAIL | SKIP
                still = [n for n in confirmed if outcomes.get(n) in good]
                flaky += [n for n in confirmed if n not in still]
                confirmed = still
        cats["passed unpatched, FAILED patched"] = confirmed
        cats["flaky (outcome changed on rerun)"] = sorted(set(flaky))
        regressions = confirmed

    _print_table(cats, unpatched, patched)
    if regressions:
        print(f"\nPASSED UNPATCHED BUT FAILED PATCHED ({len(regressions)}):")
        for nodeid in regressions:
            print(f"  {_short(nodeid)}\n      {_reason(patched, nodeid)[:300]}")
    if cats.get("flaky (outcome changed on rerun)"):
        print("\nflaky (patched-only failure not reproduced on rerun): "
              + ", ".join(_short(n) for n in cats["flaky (outcome changed on rerun)"]))
    if cats["failed unpatched, passed patched"]:
        print("\nfailed unpatched but passed patched: "
              + ", ".join(_short(n) for n in cats["failed unpatched, passed patched"]))
    if cats["failed both"]:
        print("\nfailed both (not a patch problem; first reasons):")
        for nodeid in cats["failed both"]:
            print(f"  {_short(nodeid)}: {_reason(unpatched, nodeid)[:160]}")
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump({"categories": cats, "patched_calls": patched["patched_calls"],
                       "patched_by_class": patched["patched_by_class"],
                       "seconds": {m: r["duration_s"] for m, r in records.items()}}, f, indent=1)
    if regressions:
        print(f"\nFAIL: {len(regressions)} test(s) pass unpatched and fail patched")
        return 1
    print("\nOK: every test that passes unpatched also passes patched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
