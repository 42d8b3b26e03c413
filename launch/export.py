"""Export a trained backbone to ONNX and check it against PyTorch with onnxruntime.

Two exporters exist across the supported torch versions (>= 2.4):

* ``"torchscript"``: the tracing exporter (``torch.onnx.export(..., dynamo=False)``),
  available everywhere, deprecated since torch 2.9.
* ``"dynamo"``: the ``torch.export``-based exporter (``dynamo=True``), default from
  torch 2.9 on; it needs ``onnxscript``.

``exporter="auto"`` picks dynamo on torch >= 2.9 when onnxscript is importable
and the tracing exporter otherwise, and falls back to the tracing exporter
(with a warning) if the dynamo export raises.  Both produce a graph with one
input ``"input"`` ``(B, C, H, W)`` and one output ``"embedding"`` ``(B, E)``;
with ``dynamic_batch=True`` the batch dimension ``B`` is symbolic.

CLI::

    python -m launch.export --checkpoint DIR --output model.onnx
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "OnnxMismatchError",
    "export_onnx",
    "main",
    "resolve_exporter",
    "verify_onnx",
]

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
_EXPORTERS = ("auto", "dynamo", "torchscript")


class OnnxMismatchError(RuntimeError):
    """The ONNX model's output differs from PyTorch's by more than the tolerance."""


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _export_params() -> set[str]:
    return set(inspect.signature(torch.onnx.export).parameters)


def resolve_exporter(exporter: str = "auto") -> str:
    """Resolve ``"auto"`` to ``"dynamo"`` or ``"torchscript"`` for this torch install.

    Raises:
        ValueError: unknown exporter name.
        RuntimeError: ``"dynamo"`` requested but unsupported / onnxscript missing.
    """
    if exporter not in _EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; valid: {', '.join(_EXPORTERS)}")
    has_dynamo = "dynamo" in _export_params()
    has_onnxscript = importlib.util.find_spec("onnxscript") is not None
    if exporter == "dynamo":
        if not (has_dynamo and has_onnxscript):
            raise RuntimeError(
                "the dynamo ONNX exporter needs torch.onnx.export(dynamo=...) (torch >= 2.5) "
                f"and onnxscript; torch={torch.__version__}, onnxscript "
                f"{'installed' if has_onnxscript else 'missing'}"
            )
        return "dynamo"
    if exporter == "auto":
        modern = _torch_version() >= (2, 9)  # dynamo is torch's default from 2.9
        return "dynamo" if has_dynamo and has_onnxscript and modern else "torchscript"
    return exporter


def _dummy_input(input_shape: Sequence[int], dynamic_batch: bool) -> torch.Tensor:
    """Random example input; ``input_shape`` is ``(C, H, W)`` or ``(B, C, H, W)``."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (2,) + shape
    if len(shape) != 4:
        raise ValueError(f"input_shape must be (C, H, W) or (B, C, H, W), got {input_shape}")
    if dynamic_batch and shape[0] < 2:
        # torch.export specialises sizes 0/1, so trace a dynamic batch with B >= 2.
        shape = (2,) + shape[1:]
    return torch.randn(shape)


def _export_torchscript(
    model: nn.Module, x: torch.Tensor, path: str, opset: int, dynamic_batch: bool
) -> None:
    kwargs: dict[str, Any] = dict(
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        do_constant_folding=True,
    )
    if dynamic_batch:
        kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    if "dynamo" in _export_params():
        kwargs["dynamo"] = False
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(model, (x,), path, **kwargs)


def _export_dynamo(
    model: nn.Module, x: torch.Tensor, path: str, opset: int, dynamic_batch: bool
) -> None:
    params = _export_params()
    kwargs: dict[str, Any] = dict(
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        dynamo=True,
        verbose=False,
    )
    if "external_data" in params:
        kwargs["external_data"] = False  # one self-contained file (fine below 2 GB)
    if dynamic_batch:
        # One entry per positional argument of forward(), so the name does not matter.
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
    torch.onnx.export(model, (x,), path, **kwargs)


def export_onnx(
    backbone: nn.Module,
    path: str | os.PathLike,
    input_shape: Sequence[int],
    opset: int = 17,
    dynamic_batch: bool = True,
    exporter: str = "auto",
) -> str:
    """Export ``backbone`` (in eval mode) to an ONNX file.

    Args:
        backbone: module mapping ``(B, C, H, W)`` images to ``(B, E)`` embeddings.
        path: output ``.onnx`` file (parent directories are created).
        input_shape: ``(C, H, W)`` or ``(B, C, H, W)`` of one example input.
        opset: ONNX opset to target.  (The dynamo exporter on torch >= 2.9 builds
            at opset 18 and converts down; if conversion fails it keeps 18.)
        dynamic_batch: make the batch dimension symbolic.
        exporter: ``"auto"``, ``"dynamo"`` or ``"torchscript"`` (see module doc).

    Returns:
        The name of the exporter that produced the file.

    The module's train/eval mode is restored afterwards; it is exported on its
    current device (the example input is created there).

    Longer than a screen: mostly the docstring and the exporter's arguments, kept together.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    chosen = resolve_exporter(exporter)
    device = next(backbone.parameters()).device
    x = _dummy_input(input_shape, dynamic_batch).to(device)
    was_training = backbone.training
    backbone.eval()
    try:
        if chosen == "dynamo":
            try:
                _export_dynamo(backbone, x, path, opset, dynamic_batch)
            except Exception as err:  # noqa: BLE001 - fall back only in auto mode
                if exporter != "auto":
                    raise
                warnings.warn(
                    f"dynamo ONNX export failed ({type(err).__name__}: {err}); "
                    "falling back to the TorchScript exporter",
                    RuntimeWarning,
                    stacklevel=2,
                )
                chosen = "torchscript"
                _export_torchscript(backbone, x, path, opset, dynamic_batch)
        else:
            _export_torchscript(backbone, x, path, opset, dynamic_batch)
    finally:
        backbone.train(was_training)
    return chosen


def verify_onnx(
    path: str | os.PathLike,
    backbone: nn.Module,
    inputs: torch.Tensor | np.ndarray,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> float:
    """Run the ONNX model with onnxruntime (CPU) and compare with PyTorch.

    Args:
        path: ONNX file written by :func:`export_onnx`.
        backbone: the PyTorch module it was exported from (run in eval mode).
        inputs: ``(B, C, H, W)`` batch.
        rtol, atol: tolerance, elementwise ``|onnx - torch| <= atol + rtol * |torch|``.

    Returns:
        The maximum absolute difference between the two outputs.

    Raises:
        OnnxMismatchError: shapes differ or the tolerance is exceeded.
    """
    import onnxruntime as ort

    x = torch.as_tensor(np.asarray(inputs, dtype=np.float32))  # (B, C, H, W)
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    onnx_out = session.run(None, {input_name: x.numpy()})[0]  # (B, E)

    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            ref = backbone(x.to(device)).float().cpu().numpy()  # (B, E)
    finally:
        backbone.train(was_training)

    if onnx_out.shape != ref.shape:
        raise OnnxMismatchError(f"ONNX output shape {onnx_out.shape} != PyTorch {ref.shape}")
    diff = np.abs(onnx_out.astype(np.float64) - ref.astype(np.float64))
    max_diff = float(diff.max()) if diff.size else 0.0
    bad = diff > atol + rtol * np.abs(ref)
    if not np.all(np.isfinite(onnx_out)) or bad.any():
        raise OnnxMismatchError(
            f"ONNX output differs from PyTorch: max |diff| = {max_diff:.3g}, "
            f"{int(bad.sum())}/{bad.size} elements above atol={atol:g} + rtol={rtol:g}*|ref|"
        )
    return max_diff


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m launch.export", description="Export a trained backbone to ONNX."
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint directory of a training run")
    p.add_argument("--output", required=True, help="output .onnx file")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument(
        "--input-shape",
        type=int,
        nargs=3,
        metavar=("C", "H", "W"),
        default=None,
        help="per-sample input shape (default: the backbone's in_channels / image_size)",
    )
    p.add_argument("--static-batch", action="store_true", help="do not make the batch dim dynamic")
    p.add_argument("--exporter", choices=_EXPORTERS, default="auto")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: load a checkpoint's backbone, export it, verify with onnxruntime."""
    args = _parse_args(argv)
    from launch.checkpoint import load_backbone  # lazy: app-level module, heavy deps

    loaded = load_backbone(args.checkpoint)
    backbone: nn.Module = loaded[0] if isinstance(loaded, tuple) else loaded
    backbone = backbone.cpu().eval()

    if args.input_shape is not None:
        input_shape = tuple(args.input_shape)
    elif hasattr(backbone, "in_channels") and hasattr(backbone, "image_size"):
        input_shape = (backbone.in_channels, backbone.image_size, backbone.image_size)
    else:
        raise SystemExit("cannot infer the input shape of this backbone; pass --input-shape C H W")

    dynamic = not args.static_batch
    used = export_onnx(backbone, args.output, input_shape, args.opset, dynamic, args.exporter)
    print(f"exported {args.output} ({used} exporter, opset {args.opset}, input {input_shape})")
    if not args.no_verify:
        batches = (1, 3) if dynamic else (2,)
        for b in batches:
            diff = verify_onnx(args.output, backbone, torch.randn(b, *input_shape))
            print(f"verified batch {b}: max |onnx - torch| = {diff:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
