"""Tests for launch.export: ONNX export with a dynamic batch, checked with onnxruntime."""

from __future__ import annotations

import sys
import types

import numpy as np
import onnx
import pytest
import torch

from launch.export import OnnxMismatchError, export_onnx, main, resolve_exporter, verify_onnx
from launch.models import build_backbone


def _trained_like(model: torch.nn.Module, shape: tuple[int, ...]) -> torch.nn.Module:
    """Give BatchNorm non-trivial running statistics, as after training."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(shape) * 2 + 0.5)
    return model


def _batch_dim(path) -> onnx.TensorShapeProto.Dimension:
    return onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]


def _check_dynamic(path, model, chw) -> list[float]:
    dim = _batch_dim(path)
    assert dim.dim_param and not dim.HasField("dim_value")  # symbolic batch
    return [verify_onnx(path, model, torch.randn(b, *chw)) for b in (1, 3)]


@pytest.mark.parametrize("exporter", ["auto", "torchscript"])
def test_small_cnn_export_dynamic_batch(tmp_path, exporter: str) -> None:
    model = _trained_like(build_backbone("cnn_small", 128, 1, 32), (8, 1, 32, 32))
    path = tmp_path / "cnn.onnx"
    used = export_onnx(model, path, (1, 32, 32), exporter=exporter)
    assert used == resolve_exporter(exporter)  # no silent fallback
    assert model.training  # mode restored
    diffs = _check_dynamic(path, model, (1, 32, 32))
    assert max(diffs) < 1e-3
    assert onnx.load(str(path)).graph.output[0].name == "embedding"


def test_r18_export_dynamic_batch(tmp_path) -> None:
    model = _trained_like(build_backbone("r18", 512, 3, 112), (2, 3, 112, 112))
    path = tmp_path / "r18.onnx"
    export_onnx(model, path, (3, 112, 112), opset=17)
    diffs = _check_dynamic(path, model, (3, 112, 112))
    assert max(diffs) < 1e-2


def test_verify_detects_mismatch(tmp_path) -> None:
    model = _trained_like(build_backbone("cnn_small", 16, 1, 16, width=4), (4, 1, 16, 16))
    path = tmp_path / "m.onnx"
    export_onnx(model, path, (1, 16, 16), exporter="torchscript")
    x = torch.randn(2, 1, 16, 16)
    assert verify_onnx(path, model, x) < 1e-4
    with torch.no_grad():
        model.features_bn.bias += 0.01  # the exported file no longer matches
    with pytest.raises(OnnxMismatchError):
        verify_onnx(path, model, x)
    assert verify_onnx(path, model, x, rtol=0.0, atol=0.02) == pytest.approx(0.01, rel=1e-3)


def test_static_batch(tmp_path) -> None:
    model = build_backbone("cnn_small", 16, 1, 16, width=4).eval()
    path = tmp_path / "static.onnx"
    export_onnx(model, path, (3, 1, 16, 16), dynamic_batch=False, exporter="torchscript")
    assert _batch_dim(path).dim_value == 3
    verify_onnx(path, model, np.random.default_rng(0).normal(size=(3, 1, 16, 16)))


def test_resolve_exporter() -> None:
    assert resolve_exporter("auto") in ("dynamo", "torchscript")
    assert resolve_exporter("torchscript") == "torchscript"
    with pytest.raises(ValueError, match="auto"):
        resolve_exporter("tensorrt")


def test_main_cli_with_stub_checkpoint_loader(tmp_path, monkeypatch, capsys) -> None:
    model = build_backbone("cnn_small", 16, 1, 16, width=4).eval()
    seen = []

    def load_backbone(checkpoint_dir):
        seen.append(checkpoint_dir)
        return model

    stub = types.ModuleType("launch.checkpoint")
    stub.load_backbone = load_backbone
    monkeypatch.setitem(sys.modules, "launch.checkpoint", stub)
    out = tmp_path / "cli" / "model.onnx"
    argv = ["--checkpoint", str(tmp_path), "--output", str(out), "--exporter", "torchscript"]
    assert main(argv) == 0
    assert seen == [str(tmp_path)] and out.exists()
    printed = capsys.readouterr().out
    assert "verified batch 1" in printed and "verified batch 3" in printed
