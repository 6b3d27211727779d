"""Export a run's model, preprocessing included, to ONNX (or TorchScript) with a JSON sidecar."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from imgcls import fileio
from imgcls.data.transforms import Preprocess
from imgcls.errors import ImgclsError, RunFolderError
from imgcls.train.checkpoint import MODEL_FILE, sha256_file

FORMATS = ("onnx", "torchscript")
OPSET = 17  # Resize/ReduceMean semantics we rely on are stable here; ONNX Runtime 1.1x+ runs it.
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probabilities")


class ExportModule(nn.Module):
    """uint8 NHWC images -> (logits, probabilities): the same Preprocess the trainer used, then the model.

    Normalisation, grey->RGB expansion and resizing live inside the graph so that a consumer of the
    file feeds decoded pixels and cannot get mean/std or channel order wrong; they cost a few
    elementwise ops next to the convolutions.
    """

    def __init__(self, model: nn.Module, preprocess: Preprocess):
        super().__init__()
        self.model = model.eval()
        self.preprocess = preprocess

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(self.preprocess(images)).float()
        return logits, torch.softmax(logits, dim=1)


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """model.onnx -> model.onnx.json (never collides with the run folder's own *.json)."""
    return Path(str(model_path) + ".json")


def describe(predictor, fmt: str) -> dict:
    """What a consumer needs besides the graph: input layout, normalisation, classes, provenance."""
    channels, size = predictor.data_layout
    run_dir = predictor.run_dir
    run = fileio.read_json(run_dir / "run.json") if run_dir else {}
    return {
        "format": fmt, "opset": OPSET if fmt == "onnx" else None,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC",
                  "shape": ["batch", size[0], size[1], channels]},
        "outputs": list(OUTPUT_NAMES),
        "normalisation_in_graph": True,
        "model_input_size": predictor.model_info["image_size"] or list(size),
        "in_chans": predictor.model_info["in_chans"],
        "mean": predictor.model_info["mean"], "std": predictor.model_info["std"],
        "classes": predictor.classes_file or predictor.classes.to_json(),
        "model": predictor.model_info,
        "source_run": str(run_dir.resolve()) if run_dir else None,
        "config_hash": run.get("config_hash"),
        "weights_sha256": sha256_file(run_dir / MODEL_FILE) if run_dir else None,
    }


def _example_input(predictor, batch: int = 2) -> torch.Tensor:
    channels, size = predictor.data_layout
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, size[0], size[1], channels), dtype=torch.uint8, generator=generator)


def _onnx_bytes(module: ExportModule, example: torch.Tensor) -> bytes:
    """Graph via the TorchScript-based exporter.

    The torch.export-based exporter needs onnxscript, which is not a dependency; the TorchScript
    exporter handles these feed-forward CNNs exactly (see tests/test_export.py), so its deprecation
    and tracer warnings are silenced here rather than shown to every user.
    """
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in OUTPUT_NAMES}})
    return buffer.getvalue()


def _torchscript(module: ExportModule, example: torch.Tensor, path: Path) -> None:
    """Traced TorchScript for C++/mobile consumers; torch marks jit deprecated, it still runs everywhere."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, (example,), check_trace=False)
        with fileio.atomic_path(path) as tmp:
            torch.jit.save(traced, str(tmp))


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, fmt: str = "onnx") -> dict:
    """Write the run's model as `fmt` plus `<out>.json`; returns the sidecar content with the paths."""
    from imgcls.predict import Predictor

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    predictor = Predictor.from_run(run_dir, device="cpu", precision="fp32")
    out = Path(out) if out else Path(run_dir) / ("model.onnx" if fmt == "onnx" else "model.torchscript.pt")
    if out.is_dir():
        raise ImgclsError(f"{out}: is a folder; give a file name for the exported model")
    out.parent.mkdir(parents=True, exist_ok=True)
    module = ExportModule(predictor.model.float().to(memory_format=torch.contiguous_format), predictor.preprocess)
    example = _example_input(predictor)
    with torch.no_grad():
        if fmt == "onnx":
            data = _onnx_bytes(module, example)
            with fileio.atomic_path(out) as tmp:
                tmp.write_bytes(data)
        else:
            _torchscript(module, example, out)
    meta = describe(predictor, fmt)
    fileio.write_json(sidecar_path(out), meta)
    return {**meta, "path": str(out), "sidecar": str(sidecar_path(out))}


def export_onnx(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> dict:
    """ONNX graph (uint8 NHWC in, logits + probabilities out) and its sidecar JSON."""
    return export_run(run_dir, out, "onnx")


def read_sidecar(model_path: str | os.PathLike) -> dict:
    """The sidecar of an exported model, or a clear error naming what is missing."""
    path = sidecar_path(model_path)
    if not Path(model_path).is_file():
        raise RunFolderError(f"{model_path}: exported model not found")
    if not path.is_file():
        raise RunFolderError(f"{path}: sidecar JSON missing; re-export with `imgcls export`")
    return fileio.read_json(path)
