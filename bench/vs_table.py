"""Summarises `bench/vs_torch.sh` output as the markdown table of results/README.md.

    sh bench/vs_torch.sh 3 64 | tee vs.jsonl
    python3 bench/vs_table.py vs.jsonl [--peak 353]

The input holds, per model and round, flowlab's `bench --json` line followed by
torch_reference.py's line. Each row gives the medians over rounds of both sides' forward,
backward and step times, the median ratio PyTorch ÷ flowlab of the step with each round's
ratio in brackets, flowlab's median GFLOP/s (and its share of `--peak` GFLOP/s, the
nominal peak), the median of its share of the FMA peak `flowlab bench` measured between
each round's steps (`pct_peak`; on a shared VM the cores deliver less than their nominal
peak in slow hours), and flowlab's largest peak RSS. Standard library only.
"""

import argparse
import json
import statistics as st


def pairs(path):
    """(flowlab, torch) line pairs in file order; other lines are ignored."""
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                rows.append(json.loads(line))
    out, pending = [], None
    for r in rows:
        if "torch" in r:
            if pending is None:
                raise SystemExit(f"a PyTorch line without a flowlab line before it: {r}")
            out.append((pending, r))
            pending = None
        else:
            pending = r
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("jsonl", help="vs_torch.sh output")
    ap.add_argument("--peak", type=float, default=353.0, help="the cores' peak GFLOP/s")
    a = ap.parse_args()
    by_model = {}
    for fl, pt in pairs(a.jsonl):
        by_model.setdefault(pt["variant"], []).append((fl, pt))
    print(
        "| model (params) | flowlab fwd / bwd / **step** ms | PyTorch fwd / bwd / **step** ms "
        "| PyTorch ÷ flowlab (rounds) | flowlab GFLOP/s (% of peak) | % of measured peak | peak RSS |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for model, rounds in by_model.items():
        fl = [f for f, _ in rounds]
        pt = [p for _, p in rounds]

        def med(side, key):
            return st.median(r[key] for r in side)

        if fl[0]["params"] != pt[0]["params"]:
            raise SystemExit(f"{model}: parameter counts differ: {fl[0]['params']} vs {pt[0]['params']}")
        ratios = [p["step_ms"] / f["step_ms"] for f, p in rounds]
        gflops = med(fl, "gflops")
        measured = [f["pct_peak"] for f in fl if f.get("pct_peak") is not None]
        measured = f"{st.median(measured):.0f} %" if measured else "–"
        times = lambda side: " / ".join(f"{med(side, k):.1f}" for k in ("fwd_ms", "bwd_ms"))
        print(
            f"| {model} ({fl[0]['params']:,}) "
            f"| {times(fl)} / **{med(fl, 'step_ms'):.1f}** "
            f"| {times(pt)} / **{med(pt, 'step_ms'):.1f}** "
            f"| **{st.median(ratios):.2f}×** ({', '.join(f'{r:.2f}' for r in ratios)}) "
            f"| {gflops:.1f} ({100 * gflops / a.peak:.0f} %) | {measured} "
            f"| {max(r['peak_rss_mb'] for r in fl):.0f} MB |"
        )


if __name__ == "__main__":
    main()
