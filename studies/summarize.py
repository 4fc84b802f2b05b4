"""Markdown tables of the studies for docs/experiments.md, from the CSVs their reports wrote.

    .venv/bin/python studies/summarize.py [STUDY ...]     # default: every docs/img/studies/*.csv

One row per group of seeds (the report's grouping): the variant's name, n, the final and the last-rounds mean
test accuracy (mean ± sample std over the seeds), the best accuracy, the final test loss, the uplink MB
of each link, the modelled seconds, and, where the report had them, the accuracy at the deadline
(``--at-time``) and the rounds to the target (median [min-max], reached k/n).
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

IMG = Path(__file__).resolve().parents[1] / "docs" / "img" / "studies"


def pm(row: dict[str, str], col: str, scale: float = 1.0, digits: int = 2) -> str:
    v, s = row.get(col, ""), row.get(f"{col}_std", "")
    if v in ("", None):
        return "-"
    text = f"{float(v) * scale:.{digits}f}"
    return text + (f" ± {float(s) * scale:.{digits}f}" if s not in ("", None) else "")


def table(study: str) -> str:
    with open(IMG / f"{study}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cols = rows[0].keys()
    last = next((c for c in cols if c.startswith("last") and c.endswith("_mean_acc")), None)
    at = next((c for c in cols if c.startswith("at_") and c.endswith("s_acc")), None)
    links = sorted(c for c in cols if c.startswith("uplink_bytes_L") and not c.endswith("_std"))
    head = ["variant", "n", "final acc %"]
    head += [f"mean of last {last[4:-9]} %"] if last else []
    head += [f"acc at {at[3:-5]} s %"] if at else []
    head += ["best acc %", "final loss"] + [f"MB L{c[-1]}" for c in links] + ["virtual s"]
    target = "rounds_to_target" in cols
    head += ["rounds to target", "virtual s to target", "reached"] if target else []
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['run']}`", r["n"], pm(r, "final_acc", 100)]
        cells += [pm(r, last, 100)] if last else []
        cells += [pm(r, at, 100)] if at else []
        loss = "diverged" if r["status"] == "diverged" else pm(r, "final_loss", 1, 3)  # stopped at non-finite
        cells += [pm(r, "best_acc", 100), loss]
        cells += [f"{float(r[c]) / 1e6:.1f}" if r[c] else "-" for c in links]
        cells += [f"{float(r.get('virtual_s', r.get('modelled_s'))):.1f}"]  # older CSVs: modelled_s
        if target:
            rt = r["rounds_to_target"]
            rng = f" [{r['rounds_to_target_min']}-{r['rounds_to_target_max']}]" if rt and r["n"] != "1" else ""
            vt = r.get("virtual_s_to_target", "")
            vrng = (f" [{float(r['virtual_s_to_target_min']):.1f}-{float(r['virtual_s_to_target_max']):.1f}]"
                    if vt and r["n"] != "1" else "")
            cells += [(f"{float(rt):g}" + rng) if rt else "-", (f"{float(vt):.1f}" + vrng) if vt else "-",
                      r["reached_target"]]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    studies = sys.argv[1:] or sorted(p.stem for p in IMG.glob("*.csv"))
    for s in studies:
        print(f"### {s}\n\n{table(s)}\n")


if __name__ == "__main__":
    main()
