"""Render a pytest-benchmark JSON (``make bench``) as the markdown of ``bench/RESULTS.md``.

    python bench/report.py bench/results/latest.json [bench/RESULTS.md] > bench/RESULTS.md.tmp

With the previous RESULTS.md as second argument its last section (KEPT_HEADING: other builds of the
extension, measured with the ab_*.py scripts) is carried over to the end of the new one.

One table per group ``<op>-<mode>-<shape>``: provider, median, IQR, min, speed-up vs the
``reference`` provider (reference median / provider median, > 1 = faster), peak memory
(``fwd_bwd`` only) and notes; then the design.md §3 targets with what this run measured.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from typing import Dict, List, Optional

PROVIDER_ORDER = ["reference", "compile", "compile_full", "loop", "sdpa", "cpu", "triton", "cuda",
                  "vanilla", "concept_image", "concept_image_problem", "concept_image_ref", "concept_roi", "concept_roi_ref"]
BACKENDS = ["cpu", "triton", "cuda"]
OP_ORDER = ["ot_similarity", "channel_attention", "position_attention", "train_step", "method_step"]
SHAPE_ORDER = ["smoke", "cpu", "cpu_rowstop", "cpu_classes", "cpu_n49", "cpu_n196", "paper", "paper_rowstop",
               "gpu_n49", "gpu_n196", "gpu_patch_n4", "demo", "gpu_cub"]
MODE_ORDER = ["fwd", "fwd_bwd", "step"]
# where each op's fast backends are tracked (edit as issues move)
AWAITS = {"ot_similarity": "the `cpu` backend (issue 3)", "channel_attention": "the `cpu` backend",
          "position_attention": "the `cpu` backend"}


def _key(group: str):
    op, mode, shape = group.split("-", 2)
    idx = lambda seq, v: seq.index(v) if v in seq else len(seq)  # noqa: E731
    return (idx(OP_ORDER, op), op, idx(SHAPE_ORDER, shape), shape, idx(MODE_ORDER, mode))


def _ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _mb(mb: Optional[float]) -> str:
    return "—" if mb is None else f"{mb:,.0f}" if mb >= 10 else f"{mb:.1f}"


def _ratio(r: Optional[float]) -> str:
    return "—" if r is None else f"{r:.2f}×" if r < 10 else f"{r:.1f}×"


def _notes(b: dict) -> str:
    e = b["extra_info"]
    notes = []
    if "iters_mean" in e:
        per = b["stats"]["median"] / (e["problems"] * e["iters_mean"]) * 1e6
        notes.append(f"{e['iters_mean']:g} it/problem (batch runs {e['iters_max']}); "
                     f"{per:.2f} µs per problem-iteration")
    if "compile_graphs" in e:
        notes.append(f"{e['compile_graphs']} graph(s), {e['graph_breaks']} graph break(s)")
    if "ratio_to_vanilla" in e:
        notes.append(f"{e['ratio_to_vanilla']:g}× the vanilla step")
    if "loss_terms_ms" in e:
        parts = f" ({e['loss_parts']})" if e.get("loss_parts") else ""
        notes.append(f"method's loss terms{parts}: {e['loss_terms_ms']:g} ms forward")
    if e.get("backends"):
        notes.append("backends " + ", ".join(f"{k}={v}" for k, v in sorted(e["backends"].items())))
    if e.get("provider") == "loop":
        notes.append("one call per query, `.item()` per iteration")
    if e.get("mode") == "fwd_bwd" and "bcc_mb" in e and e.get("op") == "channel_attention":
        notes.append(f"B·C·C fp32 = {e['bcc_mb']:g} MB")
    if "rounds" in e:
        notes.append(f"{e['rounds']} rounds")
    lo, hi = e.get("loadavg_before"), e.get("loadavg_after")
    if lo is not None and hi is not None:
        notes.append(f"load {lo:g}→{hi:g}")
    return "; ".join(notes)


def _table(group: str, benches: List[dict], skipped: List[dict]) -> List[str]:
    benches = sorted(benches, key=lambda b: PROVIDER_ORDER.index(b["extra_info"]["provider"])
                     if b["extra_info"]["provider"] in PROVIDER_ORDER else 99)
    e0 = benches[0]["extra_info"]
    ref = next((b for b in benches if b["extra_info"]["provider"] == "reference"), None)
    ref_med = ref["stats"]["median"] if ref else None
    op, mode, shape = group.split("-", 2)
    out = [f"### {op} · {mode.replace('_', '+')} · {shape}", "",
           f"{e0.get('shape_desc', '')}; {e0.get('device', '?')}, {e0.get('dtype', '?')}, "
           f"at least {e0.get('shape_rounds', e0.get('rounds', '?'))} timed rounds per provider after 1 warm-up "
           f"(fast providers: about 1 s of calls, at most 50; `rounds` in the notes).", "",
           "| provider | median (ms) | IQR (ms) | min (ms) | vs reference | peak MB | notes |",
           "|---|---:|---:|---:|---:|---:|---|"]
    for b in benches:
        s, e = b["stats"], b["extra_info"]
        ratio = ref_med / s["median"] if ref_med else None
        peak = e.get("peak_mb")
        out.append(f"| {e['provider']} | {_ms(s['median'])} | {_ms(s['iqr'])} | {_ms(s['min'])} | {_ratio(ratio)} | "
                   f"{_mb(peak)} | {_notes(b)} |")
    by_reason: Dict[str, List[str]] = defaultdict(list)
    for s in skipped:
        by_reason[s["reason"]].append(f"`{s['provider']}`")
    for reason, provs in by_reason.items():
        out.append(f"\nSkipped: {', '.join(provs)}: {reason}.")
    out.append("")
    return out


def _best_backend(groups: Dict[str, List[dict]], group: str) -> Optional[dict]:
    cands = [b for b in groups.get(group, []) if b["extra_info"]["provider"] in BACKENDS]
    return min(cands, key=lambda b: b["stats"]["median"]) if cands else None


def _provider(groups, group: str, name: str) -> Optional[dict]:
    return next((b for b in groups.get(group, []) if b["extra_info"]["provider"] == name), None)


def _speedup(groups, group: str, fast: Optional[dict], base: str) -> Optional[float]:
    b = _provider(groups, group, base)
    return b["stats"]["median"] / fast["stats"]["median"] if (b and fast) else None


def _targets(groups: Dict[str, List[dict]]) -> List[str]:
    out = ["## Targets (design.md §3)", "",
           "| target | where | measured in this run |", "|---|---|---|"]

    # 1. ot_similarity fwd+bwd CPU
    g = "ot_similarity-fwd_bwd-cpu"
    best = _best_backend(groups, g)
    context = []
    for name in ("compile",):
        r = _speedup(groups, g, _provider(groups, g, name), "reference")
        if r:
            context.append(f"torch.compile(step) {_ratio(r)}")
    gl = "ot_similarity-fwd_bwd-cpu_rowstop"
    r = _speedup(groups, gl, _provider(groups, gl, "loop"), "reference")
    if r:
        context.append(f"published loop call pattern {_ratio(r)} (stop='row' group)")
    if best:
        ref = _provider(groups, g, "reference")
        mem = ""
        if ref and ref["extra_info"].get("peak_mb") and best["extra_info"].get("peak_mb") is not None:
            mem = f", peak memory {best['extra_info']['peak_mb'] / ref['extra_info']['peak_mb']:.2f}× the reference"
        meas = f"`{best['extra_info']['provider']}`: {_ratio(_speedup(groups, g, best, 'reference'))}{mem}"
    else:
        meas = f"awaits {AWAITS['ot_similarity']}"
    out.append(f"| ot_similarity fwd+bwd ≥ 30× the vectorized reference, peak memory ≤ ¼ | CPU, `{g}` | "
               f"{meas}" + (f" (for scale: {'; '.join(context)})" if context else "") + " |")

    # 2. ot_similarity on the paper shape, H100
    g = "ot_similarity-fwd_bwd-paper"
    best = _best_backend(groups, g)
    if best:
        meas = f"`{best['extra_info']['provider']}`: {_ms(best['stats']['median'])} ms for the negatives call"
    elif g in groups:
        meas = f"awaits the `cuda`/`triton` backend (reference: {_ms(groups[g][0]['stats']['median'])} ms)"
    else:
        meas = "needs a GPU: not run here"
    out.append(f"| whole concept similarity ≤ 2 ms per step, zero host syncs | H100, `{g}` | {meas} |")

    # 3. channel_attention fwd+bwd CPU
    g = "channel_attention-fwd_bwd-cpu_n49"
    best = _best_backend(groups, g)
    sd = _provider(groups, g, "sdpa")
    ctx = []
    if sd:
        ctx.append(f"SDPA composition {_ratio(_speedup(groups, g, sd, 'reference'))} the reference, "
                   f"peak {sd['extra_info'].get('peak_mb', 0):,.0f} MB")
    ref = _provider(groups, g, "reference")
    if ref and ref["extra_info"].get("peak_mb") is not None:
        ctx.append(f"reference peak {ref['extra_info']['peak_mb']:,.0f} MB (one B·C·C buffer = "
                   f"{ref['extra_info'].get('bcc_mb', 0):g} MB)")
    if best:
        meas = (f"`{best['extra_info']['provider']}`: {_ratio(_speedup(groups, g, best, 'reference'))} the reference, "
                f"{_ratio(_speedup(groups, g, best, 'sdpa'))} SDPA, peak {best['extra_info'].get('peak_mb', 0):,.0f} MB")
    else:
        meas = f"awaits {AWAITS['channel_attention']}"
    out.append(f"| channel_attention fwd+bwd ≥ 3× eager DANet, ≥ 1.0× SDPA, no B·C·C buffer | CPU, `{g}` | "
               f"{meas}" + (f" ({'; '.join(ctx)})" if ctx else "") + " |")

    # 4. channel_attention H100
    g = "channel_attention-fwd_bwd-gpu_n49"
    best = _best_backend(groups, g)
    if best:
        meas = f"`{best['extra_info']['provider']}`: {_ratio(_speedup(groups, g, best, 'sdpa'))} SDPA (padded)"
    elif g in groups:
        meas = "awaits the `cuda`/`triton` backend"
    else:
        meas = "needs a GPU: not run here"
    out.append(f"| channel_attention fwd+bwd ≥ 1.3× SDPA memory-efficient (padded), fp32 | H100, `{g}` | {meas} |")

    g = "train_step-step-demo"
    steps = [b for b in groups.get(g, []) if "ratio_to_vanilla" in b["extra_info"]
             and not b["extra_info"]["provider"].endswith("_ref")]
    if steps:
        meas = "; ".join(f"`{b['extra_info']['provider']}`: {b['extra_info']['ratio_to_vanilla']:g}× vanilla"
                         for b in steps)
    else:
        meas = "not measured in this run"
    out.append(f"| Concept-Tuning step ≤ 3× the vanilla step | CPU demo config, `{g}` | {meas} |")
    out.append("")
    return out


def render(data: dict) -> str:
    mi = data.get("machine_info", {})
    groups: Dict[str, List[dict]] = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    skipped: Dict[str, List[dict]] = defaultdict(list)
    for s in data.get("skipped", []):
        skipped[s["group"]].append(s)

    cpu = mi.get("cpu_model") or mi.get("cpu", {}).get("brand_raw", "?")
    la0, la1 = mi.get("loadavg_at_start"), mi.get("loadavg_at_end")
    lines = [
        "# Benchmark results",
        "",
        "Generated by `bench/report.py` from the JSON of one `make bench` run; do not edit by hand.",
        "",
        "## Machine",
        "",
        f"- CPU: {cpu}, {mi.get('cpu_count', '?')} cores, torch threads {mi.get('torch_threads', '?')}"
        + (f" (`BENCH_THREADS={mi['bench_threads']}`)" if mi.get("bench_threads") else ""),
        f"- GPU: {mi.get('cuda_device') or 'none'}",
        f"- torch {mi.get('torch', '?')}, triton {mi.get('triton', '?')}, python {mi.get('python_version', '?')}, "
        f"concept_kernels {mi.get('concept_kernels', '?')} (extension built: {mi.get('concept_kernels_ext', '?')})",
        f"- commit: {mi.get('commit', '?')}; run at {data.get('datetime', '?')}",
    ]
    if la0 and la1:
        lines.append(f"- load average (1/5/15 min) at start {la0}, at end {la1}: other processes on a "
                     f"{mi.get('cpu_count', '?')}-core machine inflate and scatter the times; compare ratios within "
                     "one table, and read the per-row `load` note.")
    lines += [
        "",
        "## How to reproduce",
        "",
        f"    {data.get('command', 'make bench')}",
        "",
        "which runs `pytest bench/ -q -p no:cacheprovider --benchmark-only --benchmark-json=bench/results/latest.json "
        "-k 'not smoke'` "
        "and then `python bench/report.py bench/results/latest.json bench/RESULTS.md > bench/RESULTS.md.tmp` "
        "(moved to bench/RESULTS.md; the last section, other builds of the extension, is carried over). "
        "Medians of wall time on the host (CUDA synchronised inside each timed call); ratio = reference median / "
        "provider median (> 1 is faster); peak MB = torch allocations of one fwd+bwd call above the level at its "
        "start (see bench/README.md). ot_similarity is the negatives call `select=\"topk\", k=10, eps=0.01, "
        "max_iter=200, tol=1e-3` on `testing.ot_problem` inputs; attention inputs are `testing.feature_map`.",
        "",
        "## Results",
        "",
    ]
    run_groups = sorted(groups, key=_key)
    for g in run_groups:
        lines += _table(g, groups[g], skipped.get(g, []))
    not_run = sorted((g for g in skipped if g not in groups), key=_key)
    if not_run:
        lines += ["### Not run here", ""]
        by_reason: Dict[str, List[str]] = defaultdict(list)
        for g in not_run:
            by_reason["; ".join(sorted({s["reason"] for s in skipped[g]}))].append(f"`{g}`")
        for reason, names in by_reason.items():
            lines.append(f"- {reason}: {', '.join(names)}")
        lines.append("")
    lines += _targets(groups)
    return "\n".join(lines)


# A last section of RESULTS.md that `make bench` keeps: timings of other builds of the extension
# (e.g. an x86-64-v3 = AVX2 build) from the ab_*.py scripts, which one pytest-benchmark run cannot
# give (one process loads one build). Everything from this heading to the end is carried over.
KEPT_HEADING = "## Other builds of the extension (A/B scripts; kept by report.py)"


def kept_section(previous: str) -> str:
    """The part of a previous RESULTS.md from KEPT_HEADING on ("" when it has none)."""
    at = previous.find("\n" + KEPT_HEADING + "\n")
    return previous[at + 1:].rstrip("\n") + "\n" if at >= 0 else ""


def main(argv: List[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1]) as fh:
        text = render(json.load(fh))
    if len(argv) == 3:  # the RESULTS.md being replaced: keep its section of other builds
        try:
            with open(argv[2]) as fh:
                kept = kept_section(fh.read())
        except FileNotFoundError:
            kept = ""
        text = text.rstrip("\n") + ("\n\n" + kept if kept else "\n")
    print(text.rstrip("\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
