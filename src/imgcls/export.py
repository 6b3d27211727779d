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
from imgcls.errors import ImgclsError, OptionError, RunFolderError
from imgcls.extras import require
from imgcls.train.run_folder import RunFolder

FORMATS = ("onnx", "torchscript")
OPSET = 17  # Resize/ReduceMean semantics we rely on are stable here; ONNX Runtime 1.1x+ runs it.
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probabilities")
LOG_FLOOR = 1e-30  # log of a probability that rounded to zero (an ensemble's logits)


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


class EnsembleModule(nn.Module):
    """Export graph: uint8 NHWC images -> (log of the mixed probabilities, mixed probabilities).

    The log is the ensemble's logits: softmax of it gives the mixed probabilities back, so
    consumers of a single model's graph read an ensemble's the same way."""

    def __init__(self, members: list[nn.Module], weights: list[float]):
        super().__init__()
        self.members = nn.ModuleList(members)
        total = float(sum(weights))
        self.register_buffer("weights", torch.tensor([w / total for w in weights], dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        proba = sum(self.weights[k] * member(images)[1] for k, member in enumerate(self.members))
        return torch.log(proba.clamp_min(LOG_FLOOR)), proba


def ensemble_module(folder: RunFolder) -> EnsembleModule:
    ensemble = folder.read_ensemble()
    return EnsembleModule([export_module(RunFolder(m)) for m in ensemble["members"]], ensemble["weights"])


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """model.onnx -> model.onnx.json (never collides with the run folder's own *.json)."""
    return Path(str(model_path) + RunFolder.SIDECAR_SUFFIX)


def sidecar(description: dict, fmt: str) -> dict:
    """The model's description (RunFolder.describe_model) plus what a consumer of the graph needs:
    input layout and normalisation spelled out, outputs, format."""
    info = description["model"]
    size = info["data_size"]
    return {
        "format": fmt, "opset": OPSET if fmt == "onnx" else None,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC",
                  "shape": ["batch", size[0], size[1], info["data_channels"]]},
        "outputs": list(OUTPUT_NAMES),
        "normalisation_in_graph": True,
        "model_input_size": info["image_size"] or list(size),
        "in_chans": info["in_chans"], "mean": info["mean"], "std": info["std"],
        **description,
        "source_run": str(Path(description["source_run"]).resolve()),
    }


def _example_input(info: dict, batch: int = 2) -> torch.Tensor:
    channels, size = info["data_channels"], info["data_size"]
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


def export_module(folder: RunFolder) -> nn.Module:
    """What is exported: the run's model behind its preprocessing, or an ensemble's members combined."""
    if folder.is_ensemble():
        return ensemble_module(folder)
    model, preprocess = folder.load_model()
    return ExportModule(model.float().to(memory_format=torch.contiguous_format), preprocess)


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, fmt: str = "onnx") -> dict:
    """Write the run's model as `fmt` plus `<out>.json`; returns the sidecar content with the paths."""
    if fmt not in FORMATS:
        raise OptionError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "onnx":
        require("onnx", "ONNX export")
    folder = RunFolder(run_dir)
    module = export_module(folder)
    description = folder.describe_model()
    out = Path(out) if out else folder.export_path(fmt)
    if out.is_dir():
        raise ImgclsError(f"{out}: is a folder; give a file name for the exported model")
    out.parent.mkdir(parents=True, exist_ok=True)
    example = _example_input(description["model"])
    with torch.no_grad():
        if fmt == "onnx":
            data = _onnx_bytes(module, example)
            with fileio.atomic_path(out) as tmp:
                tmp.write_bytes(data)
        else:
            _torchscript(module, example, out)
    meta = sidecar(description, fmt)
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
