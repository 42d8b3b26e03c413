"""Command line of the benchmark (``python -m benchmarks``; ``python -m launch.bench`` forwards here)."""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist

import benchmarks

from .config import DEFAULT_VARIANTS, DTYPES, VARIANTS, BenchConfig
from .memory import measure_memory_cpu, predict
from .report import filter_table, format_figure, machine_info, markdown_table, summary, write_outputs
from .runner import run_group
from .timing import time_variants, timing_worker

PROG = "python -m benchmarks"


def _parse_list(text: str, cast=int) -> list:
    """"a, b,c" -> [cast(a), cast(b), cast(c)]."""
    return [cast(x) for x in str(text).replace(" ", "").split(",") if x]


def _add_shape_options(p: argparse.ArgumentParser):
    """What is measured: shapes, dtypes, variants."""
    p.add_argument("--classes-per-rank", "-c", type=int, default=100_000, help="C_local (default 100000)")
    p.add_argument("--sweep", type=str, default=None,
                   help="comma-separated C_local values to run (replaces --classes-per-rank), e.g. 25000,50000,100000")
    p.add_argument("--embedding-size", "-d", type=int, default=512)
    p.add_argument("--batch-per-rank", "-b", type=int, default=256)
    p.add_argument("--sample-rate", "-r", type=float, default=0.1, help="rate of the sampled variants")
    p.add_argument("--chunk-size", type=int, default=8192, help="chunk size of the chunked variant")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="parameters and embeddings")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="run the head's forward under torch.autocast with this dtype")
    p.add_argument("--target-angle", type=float, default=None,
                   help="trained-like logits: each embedding this many degrees from its class's (initial) row "
                        "(default: random embeddings)")
    p.add_argument("--grad-filter", type=float, default=None,
                   help="eps of the filtered variants (default: the library's, the float32 machine epsilon)")
    p.add_argument("--grad-filter-block", type=int, default=256, help="classes per block of the filtered variants")
    p.add_argument("--variants", type=str, default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated subset of {', '.join(VARIANTS)} (default {','.join(DEFAULT_VARIANTS)})")


def _add_run_options(p: argparse.ArgumentParser):
    """How it is measured: ranks, repeats, memory, device, output."""
    p.add_argument("--world-size", "-w", type=int, default=2, help="CPU ranks to start (ignored under torchrun)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per CPU rank")
    p.add_argument("--warmup", type=int, default=2, help="untimed full steps per variant")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (the median is reported)")
    p.add_argument("--memory-steps", type=int, default=2, help="steps per memory measurement")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--malloc-default", action="store_true",
                   help="CPU memory: keep glibc's dynamic mmap threshold (freed blocks < 32 MiB may stay resident) "
                        "instead of pinning it to 1 MiB in the memory processes")
    p.add_argument("--validate", action="store_true", help="keep PartialFC's per-step input validation on")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--interleave", choices=("auto", "on", "off"), default="auto",
                   help="on: build every variant, then time them round-robin (load changes hit all alike); "
                        "off: one variant after the other, each freed before the next; auto: on for CPU, off for CUDA")
    p.add_argument("--start-method", choices=("forkserver", "spawn"), default="forkserver",
                   help="how CPU rank processes start (forkserver: fresh processes forked from a server that "
                        "imported torch; spawn: fresh interpreters)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes (C_local 4096,8192, d 64, batch 64, 2 ranks, 3 repeats): a < 1 min smoke run")
    p.add_argument("--out", type=str, default="runs/bench", help="output directory (bench.md/.csv/.json/.png)")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The options; ``--help`` prints the method (the package docstring) as well."""
    doc = benchmarks.__doc__
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(doc.split("\n\n")[1:]))
    _add_shape_options(p)
    _add_run_options(p)
    return p


@dataclass
class Where:
    """Where the run times the heads and how memory is measured there."""

    mode: str  # "cpu_group" (ranks started here), "cpu_torchrun" or "cuda"
    device: torch.device
    world: int
    rank: int
    text: str
    memory_note: str
    under_torchrun: bool


def _cpu_torchrun(args) -> Where:
    """CPU ranks started by torchrun: time in this process on its gloo group."""
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    torch.set_num_threads(args.threads)
    world = dist.get_world_size()
    return Where("cpu_torchrun", torch.device("cpu"), world, dist.get_rank(),
                 f"CPU, {world} gloo rank(s) started by torchrun x {args.threads} thread(s)",
                 "not measured (under torchrun the ranks are not fresh processes per case)", True)


def _cuda(args, under_torchrun: bool) -> Where:
    """One GPU, or one GPU per rank under torchrun (NCCL)."""
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    if under_torchrun and not dist.is_initialized():
        dist.init_process_group("nccl", device_id=device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Where("cuda", device, world, rank,
                 f"CUDA, {world} rank(s) ({'NCCL group' if world > 1 else 'no process group'})",
                 "torch.cuda.max_memory_allocated during the steps minus the allocation after the variant "
                 "was built and one warm-up fwd+bwd (weights + inputs); predicted = partialfc.plan (cuda model)",
                 under_torchrun)


def _cpu_group(args) -> Where:
    """CPU ranks started here, in a fresh gloo group per measurement."""
    world = args.world_size
    return Where("cpu_group", torch.device("cpu"), world, 0,
                 f"CPU, {world} gloo rank(s) x {args.threads} thread(s) (torch.multiprocessing "
                 f"{args.start_method}, FileStore rendezvous)",
                 "peak RSS (VmHWM / ru_maxrss) of a fresh process group per case minus the RSS after the weights "
                 "were allocated and one warm-up fwd+bwd (max over ranks): includes the weight gradient, "
                 "the optimizer state (step columns) and all temporaries; glibc's mmap threshold "
                 + ("kept dynamic" if args.malloc_default else "pinned to 1 MiB") +
                 " in those processes; predicted = partialfc.plan (device model cpu)", False)


def where_to_run(args) -> Where:
    """CPU under torchrun, CUDA (one GPU or torchrun), or CPU ranks started here."""
    under_torchrun = "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if under_torchrun and not use_cuda:
        return _cpu_torchrun(args)
    return _cuda(args, under_torchrun) if use_cuda else _cpu_group(args)


def _apply_quick(args):
    """--quick: tiny shapes and few repeats (a smoke run of well under a minute)."""
    args.sweep = args.sweep or "4096,8192"
    args.embedding_size, args.batch_per_rank, args.chunk_size = 64, 64, 1024
    args.world_size, args.warmup, args.repeats, args.memory_steps = 2, 1, 3, 2


def measure(cfg: BenchConfig, variants: list, args, where: Where) -> list[dict]:
    """Timings, memory and the planner's prediction of every variant at one class count."""
    if where.mode == "cpu_group":
        rows = run_group(timing_worker, where.world, cfg, variants, args.warmup, args.repeats,
                         args.interleave != "off", threads=args.threads, start_method=args.start_method,
                         label="bench group")[0]
        for r in ([] if args.no_memory else rows):
            r.update(measure_memory_cpu(cfg, r["variant"], args.memory_steps, args.start_method,
                                        not args.malloc_default))
    else:
        cuda = where.mode == "cuda"
        rows = time_variants(cfg, variants, args.warmup, args.repeats, where.device,
                             interleave=args.interleave == "on" or (args.interleave == "auto" and not cuda),
                             cuda_memory=cuda and not args.no_memory, memory_steps=args.memory_steps)
    for r in rows:
        plan = predict(cfg, r["variant"], where.device.type)
        if plan is not None:
            r["pred_fb"], r["pred_step"] = plan["fwd_bwd"]["above_weights"], plan["step"]["above_weights"]
            r["plan_weights"] = plan["weights"]
    return rows


def _meta(args, argv, prog: str, where: Where, cfg: BenchConfig, sweep, variants) -> dict:
    """What bench.json and bench.md say about the run: command, machine, configuration."""
    command = f"{prog} " + " ".join(sys.argv[1:] if argv is None else argv)
    return dict(command=command.strip(), machine=machine_info(where.device), where=where.text,
                memory_note=where.memory_note, config=asdict(cfg), sweep=sweep, variants=variants,
                warmup=args.warmup, repeats=args.repeats,
                started=datetime.datetime.now().isoformat(timespec="seconds"))


def main(argv=None, prog: str = PROG) -> int:
    """Run the benchmark; rank 0 prints the tables and writes the outputs."""
    args = build_parser(prog).parse_args(argv)
    if args.quick:
        _apply_quick(args)
    variants = _parse_list(args.variants, str)
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    sweep = _parse_list(args.sweep) if args.sweep else [args.classes_per_rank]
    where = where_to_run(args)
    base = BenchConfig(embedding_size=args.embedding_size, batch_per_rank=args.batch_per_rank,
                       sample_rate=args.sample_rate, chunk_size=args.chunk_size, dtype=args.dtype, amp=args.amp,
                       world_size=where.world, validate=args.validate, target_angle=args.target_angle,
                       grad_filter=args.grad_filter, grad_filter_block=args.grad_filter_block)
    meta = _meta(args, argv, prog, where, base, sweep, variants)
    t_start, rows = time.time(), []
    for c in sweep:
        part = measure(replace(base, classes_per_rank=c), variants, args, where)
        rows.extend(part)
        if where.rank == 0:
            print(markdown_table(part), flush=True)
            if filter_table(part):
                print(filter_table(part), flush=True)
    meta["seconds"] = round(time.time() - t_start, 1)
    if where.rank == 0:
        paths = write_outputs(rows, args.out, meta)
        for f in summary(rows):
            print(f"C={f['C']}: {f['name']} = {format_figure(f)}")
        print("wrote " + ", ".join(paths.values()) + f" in {meta['seconds']} s")
    if dist.is_initialized() and where.under_torchrun:
        dist.destroy_process_group()
    return 0
