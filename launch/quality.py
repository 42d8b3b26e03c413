"""Gather finished training runs into the model-quality table of ``docs/quality.md``.

    python -m launch.quality runs/quality/*            # markdown table on stdout
    python -m launch.quality runs/tune/* --json out.json

Each run folder (``train.output_dir``) holds ``config.yaml``, ``history.json`` (its ``final_eval``
is the end-of-run evaluation) and ``train_rank0.log``. A row per run: margin, seeds, the open-set
metrics (on the held-out identities, or on the validation identities when the run had
``data.val_classes`` > 0: then the split column says ``val``), the steps, and the training time read
from the log: from the line that reports the loaded data to the record of the last step (model
build and every step included; data preparation and the final evaluation not). Runs of the same
configuration (everything but the seeds) also get a mean row.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

import yaml

METRICS = (("verification_acc", "verification acc"), ("tar@far=1e-3", "TAR@FAR=1e-3"),
           ("identification_top1", "top-1"))


def _stamp(line: str) -> Optional[dt.datetime]:
    try:
        return dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    except ValueError:
        return None


def training_seconds(log_path: Path) -> tuple[Optional[float], Optional[int]]:
    """(seconds from the 'data:' line to the last step's record, that step) of a rank's log."""
    start = end = None
    last_step = None
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        at = _stamp(line)
        msg = line.split("] ", 1)[1] if "] " in line else ""
        if at is None:
            continue
        if msg.startswith("data:"):
            start, end, last_step = at, None, None  # a resumed run: count its last attempt
        elif msg.startswith("{"):
            try:
                rec = json.loads(msg)
            except ValueError:
                continue
            if "step" in rec and "loss" in rec:
                end, last_step = at, int(rec["step"])
    if start is None or end is None:
        return None, last_step
    return (end - start).total_seconds(), last_step


def read_run(run: Path) -> dict:
    """One row: the run's configuration keys, its final metrics and its training time."""
    cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    head, data, train = cfg.get("head", {}), cfg.get("data", {}), cfg.get("train", {})
    final = json.loads((run / "history.json").read_text()).get("final_eval") or {}
    seconds, step = training_seconds(run / "train_rank0.log")
    margin = str(head.get("margin", "?"))
    if int(head.get("sub_centers", 1) or 1) > 1:
        margin += f" ×{head['sub_centers']} sub-centers"
    row = {"run": run.name, "margin": margin, "seed": f"{train.get('seed', '?')}/{head.get('seed', '?')}",
           "split": "val" if int(data.get("val_classes", 0) or 0) > 0 else "heldout",
           "steps": step, "train_s": seconds}
    row.update({key: final.get(key, math.nan) for key, _ in METRICS})
    return row


def gather(runs: Iterable[Path]) -> list[dict]:
    """Rows of every run folder that finished (has history.json), in the given order."""
    return [read_run(Path(r)) for r in runs if (Path(r) / "history.json").exists()]


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _minutes(s: Optional[float]) -> str:
    return "–" if s is None else f"{int(s // 60)} min {s % 60:04.1f} s"


def markdown_table(rows: Sequence[dict], group_by: str = "margin") -> str:
    """Per-run rows, then a mean row for each group with more than one run."""
    head = ["config", "seed (train/head)", "split"] + [name for _, name in METRICS] + ["steps", "training time"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    groups: dict = {}
    for r in rows:
        groups.setdefault(r[group_by], []).append(r)
    for name, members in groups.items():
        for r in members:
            lines.append("| " + " | ".join([name, r["seed"], r["split"]] + [_fmt(r[k]) for k, _ in METRICS]
                                           + [_fmt(r["steps"]), _minutes(r["train_s"])]) + " |")
        if len(members) > 1:
            means = [sum(r[k] for r in members) / len(members) for k, _ in METRICS]
            times = [r["train_s"] for r in members if r["train_s"] is not None]
            lines.append("| " + " | ".join([name, "mean", members[0]["split"]] + [_fmt(m) for m in means]
                                           + ["", _minutes(sum(times) / len(times) if times else None)]) + " |")
    return "\n".join(lines)


def summary_table(rows: Sequence[dict], group_by: str = "margin") -> str:
    """One row per group: the mean of its runs' metrics and the number of runs (seeds)."""
    head = ["margin", "runs"] + [f"{name} (mean)" for _, name in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    groups: dict = {}
    for r in rows:
        groups.setdefault(r[group_by], []).append(r)
    for name, members in groups.items():
        means = [sum(r[k] for r in members) / len(members) for k, _ in METRICS]
        lines.append("| " + " | ".join([name, str(len(members))] + [_fmt(m) for m in means]) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (train.output_dir)")
    ap.add_argument("--group-by", default="margin", choices=("margin", "run"))
    ap.add_argument("--summary", action="store_true", help="only the mean of each group")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    rows = gather(args.runs)
    print(summary_table(rows, args.group_by) if args.summary else markdown_table(rows, args.group_by))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
