"""Tables of a run: bench.csv, bench.json, bench.md and bench.png in the output directory.

The report states figures only; the targets they are judged against are in docs/benchmarks.md.
"""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
import subprocess

import torch

from .config import VARIANTS, MiB

CSV_FIELDS = ["classes_per_rank", "variant", "rows", "global_batch", "embedding_size", "dtype", "amp",
              "world_size", "sample_rate", "chunk_size", "t_fb", "t_step", "t_mm", "eta", "gflops", "mem_fb",
              "mem_step", "pred_fb", "pred_step", "mem_base", "weights", "coll_bytes", "coll_calls",
              "coll_detail", "repeats", "skipped", "eps", "w_err", "w_bound", "x_err", "x_bound", "row_mass"]


def machine_info(device: torch.device) -> dict:
    """torch / Python versions, CPU model and cores, GPU name when timing on CUDA."""
    info = dict(torch=torch.__version__, python=platform.python_version(), cores=os.cpu_count(),
                cpu=platform.processor() or platform.machine())
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpus"] = torch.cuda.device_count()
    return info


def _mib(x) -> str:
    """Bytes as MiB with one decimal; empty for missing figures."""
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x / MiB:.1f}"


def _fmt_err(pred, meas) -> str:
    """Planner error relative to the measurement, in %; empty without both."""
    if pred is None or meas is None or meas <= 0:
        return ""
    return f"{100.0 * (pred - meas) / meas:+.1f}%"


def round_ratio(a: dict, b: dict, key: str) -> float:
    """Median over rounds of a[key] / b[key] when both were timed in the same rounds, else the
    ratio of the medians."""
    xs, ys = a.get(key + "_all"), b.get(key + "_all")
    if xs and ys and len(xs) == len(ys):
        return statistics.median([x / y for x, y in zip(xs, ys)])
    return a[key] / b[key]


def _figures_at(c: int, v: dict) -> list[dict]:
    """The summary figures of one class count (``v``: variant -> row)."""
    out = []
    for variant in ("materialized", "chunked", "adaface", "curricularface", "subcenter", "triton"):
        if variant in v:
            out.append(dict(C=c, name=f"{variant} eta (fwd+bwd)", value=v[variant]["eta"]))
    for variant in ("adaface", "curricularface", "subcenter"):
        if variant in v and "materialized" in v:  # the price of the margin beyond ArcFace's, same shapes
            out.append(dict(C=c, name=f"{variant} fwd+bwd / materialized (ArcFace) fwd+bwd",
                            value=round_ratio(v[variant], v["materialized"], "t_fb")))
    if "chunked" in v and "materialized" in v and v["materialized"].get("mem_fb"):
        out.append(dict(C=c, name="chunked / materialized memory above the weights (fwd+bwd)",
                        value=v["chunked"]["mem_fb"] / v["materialized"]["mem_fb"]))
    if "triton" in v and "materialized" in v:
        out.append(dict(C=c, name="triton fwd+bwd / materialized fwd+bwd",
                        value=round_ratio(v["triton"], v["materialized"], "t_fb")))
    if "sampled_sparse" in v and "materialized" in v:
        out.append(dict(C=c, name="sampled_sparse step / materialized step (incl. optimizer)",
                        value=round_ratio(v["sampled_sparse"], v["materialized"], "t_step")))
    for variant in ("filtered", "filtered_sparse"):
        if variant in v and "materialized" in v:
            out.append(dict(C=c, name=f"{variant} fwd+bwd / materialized fwd+bwd",
                            value=round_ratio(v[variant], v["materialized"], "t_fb")))
            out.append(dict(C=c, name=f"{variant} step / materialized step (incl. optimizer)",
                            value=round_ratio(v[variant], v["materialized"], "t_step")))
    return out


def summary(rows: list[dict]) -> list[dict]:
    """Figures the targets in docs/benchmarks.md are about, per class count, and the collective
    bytes of each variant across the class counts (``{C, name, value}`` each)."""
    by_c: dict[int, dict[str, dict]] = {}
    for r in rows:
        by_c.setdefault(r["classes_per_rank"], {})[r["variant"]] = r
    out = [f for c, v in sorted(by_c.items()) for f in _figures_at(c, v)]
    for variant in VARIANTS:
        vals = {c: by_c[c][variant]["coll_bytes"] for c in sorted(by_c) if variant in by_c[c]}
        if len(vals) > 1:
            out.append(dict(C=",".join(map(str, vals)), name=f"{variant}: collective bytes per step",
                            value=" / ".join(str(b) for b in vals.values())))
    return out


def format_figure(f: dict) -> str:
    """A summary figure as text: 3 decimals for ratios."""
    return f"{f['value']:.3f}" if isinstance(f["value"], float) else str(f["value"])


def markdown_table(rows: list[dict]) -> str:
    """The rows as one Markdown table (times in ms, memory in MiB, planner error in %)."""
    head = ("| C_local | variant | C in matmul | fwd+bwd ms | step ms | matmul ms | η | GFLOP/s | "
            "mem fwd+bwd MiB | pred MiB | err | mem step MiB | pred MiB | err | coll bytes/step | calls |")
    lines = [head, "|" + "|".join(["---"] * 16) + "|"]
    for r in rows:
        lines.append(
            f"| {r['classes_per_rank']:,} | {r['variant']} | {r['rows']:,} | {1e3 * r['t_fb']:.1f} | "
            f"{1e3 * r['t_step']:.1f} | {1e3 * r['t_mm']:.1f} | {r['eta']:.3f} | {r['gflops']:.1f} | "
            f"{_mib(r.get('mem_fb'))} | {_mib(r.get('pred_fb'))} | {_fmt_err(r.get('pred_fb'), r.get('mem_fb'))} | "
            f"{_mib(r.get('mem_step'))} | {_mib(r.get('pred_step'))} | "
            f"{_fmt_err(r.get('pred_step'), r.get('mem_step'))} | {r['coll_bytes']:,} | {r['coll_calls']} |")
    return "\n".join(lines)


def filter_table(rows: list[dict]) -> str:
    """The filtered variants' accuracy: share of class blocks skipped, and the relative error of the
    weight / embedding gradients against the exact ones next to the reported bound ("" if none)."""
    rs = [r for r in rows if "skipped" in r]
    if not rs:
        return ""
    lines = ["| C_local | variant | eps | blocks skipped | dropped mass per row (max) | W rel. error | W bound | "
             "x rel. error | x bound |", "|" + "|".join(["---"] * 9) + "|"]
    for r in rs:
        lines.append(f"| {r['classes_per_rank']:,} | {r['variant']} | {r['eps']:.3g} | {100 * r['skipped']:.1f}% | "
                     f"{r['row_mass']:.2e} | {r['w_err']:.2e} | {r['w_bound']:.2e} | {r['x_err']:.2e} | "
                     f"{r['x_bound']:.2e} |")
    return "\n".join(lines)


def _header(meta: dict) -> list[str]:
    """The lines above the table: command, machine, where, configuration, method."""
    m, c = meta["machine"], meta["config"]
    return ["# PartialFC head benchmark", "", f"`{meta['command']}`", "",
            f"- machine: {m.get('cpu')} ({m.get('cores')} cores)" + (f", GPU {m['gpu']}" if "gpu" in m else "")
            + f", torch {m['torch']}, Python {m['python']}",
            f"- {meta['where']}",
            f"- d = {c['embedding_size']}, batch per rank {c['batch_per_rank']}, dtype {c['dtype']}"
            + (f" (autocast {c['amp']})" if c["amp"] != "none" else "")
            + f", sample rate {c['sample_rate']}, chunk {c['chunk_size']}, warm-up {meta['warmup']}, "
            f"median of {meta['repeats']} repeats (slowest rank per repeat)",
            f"- memory: {meta['memory_note']}",
            "- η = (x·Wᵀ + G·W + Gᵀ·x matmul time) / (forward+backward time); GFLOP/s = 6·B·C·d / fwd+bwd; "
            "coll bytes = bytes one rank sends per full step (ring model)", ""]


def markdown_report(rows: list[dict], meta: dict, figures: list[dict]) -> str:
    """bench.md: header, table and the summary figures (targets: docs/benchmarks.md)."""
    md = _header(meta) + [markdown_table(rows), ""]
    if filter_table(rows):
        md += ["Gradient filtering (errors and bounds relative to the exact gradient's norm, all ranks):", "",
               filter_table(rows), ""]
    if figures:
        md += ["## Summary", "", "Targets for these figures: docs/benchmarks.md.", "",
               "| C_local | figure | value |", "|---|---|---|"]
        md += [f"| {f['C']} | {f['name']} | {format_figure(f)} |" for f in figures] + [""]
    return "\n".join(md)


def write_outputs(rows: list[dict], out_dir: str, meta: dict) -> dict:
    """Write bench.csv/.json/.md/.png into ``out_dir``; the paths written (no png without matplotlib)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"bench.{k}") for k in ("md", "csv", "json", "png")}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in CSV_FIELDS})
    figures = summary(rows)
    with open(paths["json"], "w") as f:
        json.dump(dict(meta=meta, rows=rows, summary=figures), f, indent=2, default=str)
    with open(paths["md"], "w") as f:
        f.write(markdown_report(rows, meta, figures))
    try:
        plot(rows, paths["png"])
    except ImportError:
        paths.pop("png")
    return paths


def _plot_variant(ax1, ax2, variant: str, rs: list[dict]):
    """One variant's lines: times against C (left), measured and planned memory (right)."""
    xs = [r["classes_per_rank"] for r in rs]
    line, = ax1.plot(xs, [1e3 * r["t_fb"] for r in rs], "o-", label=f"{variant} fwd+bwd")
    ax1.plot(xs, [1e3 * r["t_step"] for r in rs], "x--", color=line.get_color(), alpha=0.6)
    for key, style, label in (("mem_step", "o-", variant), ("pred_step", ":", None)):
        pts = [(r["classes_per_rank"], r.get(key)) for r in rs if r.get(key) is not None]
        if pts:
            ax2.plot([p[0] for p in pts], [p[1] / MiB for p in pts], style, color=line.get_color(), label=label)


def plot(rows: list[dict], path: str) -> str:
    """bench.png: step time and memory above the weights against the classes per rank."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant in VARIANTS:
        rs = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["classes_per_rank"])
        if rs:
            _plot_variant(ax1, ax2, variant, rs)
    ax1.set(xlabel="classes per rank", ylabel="ms (solid fwd+bwd, dashed + optimizer)", title="step time")
    ax2.set(xlabel="classes per rank", ylabel="MiB", title="memory above the weights, full step (dotted: plan)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return path
