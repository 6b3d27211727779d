"""Export a run's model, preprocessing included, to ONNX (or TorchScript) with a JSON sidecar."""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from imgcls import fileio
from imgcls.data.transforms import Preprocess
from imgcls.errors import ImgclsError, OptionError, RunFolderError
from imgcls.extras import require
from imgcls.runtime import cpu_has_vnni
from imgcls.train.run_folder import RunFolder

FORMATS = ("onnx", "torchscript")
MAX_INT8_ACCURACY_LOSS = 0.005  # int8 may cost at most 0.5 points of validation accuracy, else it is refused
CALIBRATION_IMAGES = 256  # activation ranges are stable from a few hundred images; more only slows export
# The tries of the int8 export, in order: how many of the first convolutions stay fp32. The first
# convolutions lose the most to int8 (README, "Prediction engines"), and keeping them costs speed,
# so they stay fp32 only when the graph before misses a bound. 3: the stem and the first
# depthwise-separable block; 6: and the first inverted-residual block (Lite0).
INT8_FP32_CONV_TRIES = (0, 3, 6)
MIN_AGREEMENT = 0.98  # top-1 labels equal to fp32's: the bar `--engine auto` sets every lossy engine (engines.Tolerance)
ACCURACY_SAMPLE = 2000  # validation images the int8 loss is measured on (enough to resolve 0.1 points)
# How the graph is built; an export of an earlier revision is rebuilt (and engine choices measured
# on it are measured again). 2: TF-style "same" padding fixed, so ONNX Runtime folds it (freeze_same_padding).
GRAPH_REVISION = 2
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
        "format": fmt, "opset": OPSET if fmt == "onnx" else None, "graph_revision": GRAPH_REVISION,
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
    return _fusable_pads(buffer.getvalue())


def _fusable_pads(graph: bytes) -> bytes:
    """Drop the empty constant_value input the exporter gives each Pad (an absent optional input,
    which means 0 as well): ONNX Runtime's Pad-into-Conv fusion refuses a Pad with three inputs
    unless the third is a constant, and an empty name is not one."""
    import onnx

    model = onnx.load_from_string(graph)
    for node in model.graph.node:
        while node.op_type == "Pad" and node.input and node.input[-1] == "":
            node.input.pop()
    return model.SerializeToString()


def _torchscript(module: ExportModule, example: torch.Tensor, path: Path) -> None:
    """Traced TorchScript for C++/mobile consumers; torch marks jit deprecated, it still runs everywhere."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, (example,), check_trace=False)
        with fileio.atomic_path(path) as tmp:
            torch.jit.save(traced, str(tmp))


def freeze_same_padding(module: nn.Module, example: torch.Tensor) -> nn.Module:
    """Give timm's TF-style "same" convolutions (Conv2dSame: EfficientNet-Lite's stride-2 ones) the
    fixed padding they compute for the graph's fixed image size, in place.

    Conv2dSame works its padding out from the input's shape at every call; traced, that is a chain
    of Shape/Ceil/Clip nodes feeding a Pad whose amounts ONNX Runtime cannot see, so it can neither
    fold the Pad into its convolution nor keep an int8 tensor int8 across it (what that cost Lite0:
    README, "Prediction engines"). With constant amounts the Pad goes (symmetric padding is the
    convolution's own; ONNX Runtime fuses the rest into the Conv).
    """
    from timm.layers.conv2d_same import Conv2dSame

    convs = [m for m in module.modules() if isinstance(m, Conv2dSame)]
    sizes: dict[int, tuple[int, int]] = {}

    def record(conv: nn.Module, args: tuple) -> None:
        sizes[id(conv)] = tuple(args[0].shape[-2:])

    hooks = [m.register_forward_pre_hook(record) for m in convs]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for hook in hooks:
            hook.remove()
    for conv in convs:
        if id(conv) in sizes:
            conv.forward = _fixed_padding_forward(conv, sizes[id(conv)])
    return module


def _fixed_padding_forward(conv: nn.Conv2d, size: tuple[int, int]):
    from timm.layers.padding import pad_same_arg

    left, right, top, bottom = pad_same_arg(list(size), list(conv.kernel_size), list(conv.stride), list(conv.dilation))
    symmetric = left == right and top == bottom

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not symmetric:
            x = nn.functional.pad(x, (left, right, top, bottom))
        return nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, (top, left) if symmetric else 0,
                                    conv.dilation, conv.groups)
    return forward


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
    freeze_same_padding(module, example)  # the graph's image size is fixed: so is each "same" padding
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


def fresh_onnx(run_dir: str | os.PathLike) -> Path:
    """The run's default ONNX export, exported first when missing or made from other weights."""
    folder = RunFolder(run_dir)
    folder.require_finished()
    onnx_path = folder.export_path("onnx")
    if not is_fresh(folder, onnx_path):
        export_onnx(run_dir, onnx_path)
    return onnx_path


def is_fresh(folder: RunFolder, export: Path) -> bool:
    """True when the export and its sidecar exist and were made from the run's current weights by
    this revision of the graph builder."""
    meta = sidecar_path(export)
    if not (export.is_file() and meta.is_file()):
        return False
    described = fileio.read_json(meta)
    return described.get("weights_sha256") == folder.weights_sha256() and \
        described.get("graph_revision") == GRAPH_REVISION


def labelled_training_data(folder: RunFolder):
    """The run's training dataset decoded at its storage layout, with its targets, or None when it
    is no longer where the run read it (the int8 checks need labelled images the model did not train on)."""
    from imgcls.data import load_dataset

    config, info = folder.read_config(), folder.model_info()
    if not Path(config.data_dir).exists():
        return None
    return load_dataset(config.data_dir, classes=folder.class_map(), channels=info["data_channels"],
                        size=tuple(info["data_size"]), on_bad="skip", csv_path=config.csv,
                        id_column=config.id_column, label_column=config.label_column,
                        resize=info.get("resize", "squash"))


def split_indices(folder: RunFolder, data, validation: int, others: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(validation rows, other rows) of the run's training dataset: a seeded sample of at most
    `validation` rows of its validation split, and of `others` rows it trained on (int8 calibrates on
    those, so calibration never sees a validation image)."""
    position = {image_id: i for i, image_id in enumerate(data.ids)}
    val = np.array([position[i] for i in folder.read_split()["val_ids"] if i in position], dtype=np.int64)
    rest = np.setdiff1d(np.arange(len(data.ids)), val)
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(val)[:validation]), np.sort(rng.permutation(rest)[:others])


class _Calibration:
    """onnxruntime.quantization's CalibrationDataReader over uint8 NHWC images, in small batches."""

    def __init__(self, images: torch.Tensor, batch: int = 32):
        self.batches = iter([{INPUT_NAME: np.ascontiguousarray(images[i:i + batch].numpy())}
                             for i in range(0, len(images), batch)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def int8_settings(full_range: bool) -> dict:
    """quantize_static's options for the int8 export (why each: quantize_int8)."""
    from onnxruntime.quantization import QuantFormat, QuantType

    return {"quant_format": QuantFormat.QDQ, "per_channel": True, "activation_type": QuantType.QUInt8,
            "weight_type": QuantType.QInt8, "reduce_range": not full_range,
            "op_types_to_quantize": ["Conv", "Gemm", "MatMul", "Clip", "Relu"]}


def quantize_int8(fp32_path: Path, out: Path, calibration: torch.Tensor, full_range: bool | None = None,
                  fp32_convs: int = 0) -> None:
    """Static QDQ int8: per-channel weights, activation ranges from the calibration images.

    Static, because dynamic quantisation leaves convolutions in fp32; per-channel, because
    depthwise and pointwise filters differ widely in range and one scale per tensor loses the
    small ones. The preprocessing at the graph's head (cast, resize, normalise) stays fp32: the
    convolutions and the classifier are quantised, where the time goes, and so are the ReLU / ReLU6
    after them, which lets ONNX Runtime fold each into its convolution's output range (without
    that, a convolution's output is quantised over its pre-activation range, up to +-100 in
    EfficientNet's stem, and most of the [0, 6] that matters falls into a few steps). Weights use
    8 bits where the CPU has VNNI and 7 bits (reduce_range) elsewhere: without VNNI, x86 int8
    kernels sum pairs of uint8 x int8 products in int16, which saturates with 8-bit weights.
    `fp32_convs`: the first that many convolutions stay in fp32 (the export's later tries). The
    measured cost of each choice is in README.md, "Prediction engines".
    """
    require("onnxruntime", "int8 export")
    import onnx
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    full_range = cpu_has_vnni() if full_range is None else full_range
    reader = _Calibration(calibration)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        convs = [node.name for node in onnx.load(str(prepared)).graph.node if node.op_type == "Conv"]
        quantize_static(str(prepared), str(out), reader, nodes_to_exclude=convs[:fp32_convs],
                        **int8_settings(full_range))


def int8_suits_this_cpu(export: Path) -> bool:
    """True when the int8 graph's weight range is the one this CPU's int8 kernels want (see quantize_int8)."""
    quantization = fileio.read_json(sidecar_path(export)).get("quantization", {})
    return quantization.get("weight_bits") == (8 if cpu_has_vnni() else 7)


ORT_LEVELS = ("none", "basic", "extended", "all")


def onnx_session(path: str | os.PathLike, threads: int | None = None, optimization: str = "all",
                 profile_prefix: str | None = None):
    """An ONNX Runtime CPU session; `optimization` is its graph level, `threads` its intra-op threads;
    with `profile_prefix`, ONNX Runtime's profiler traces every node run into a file of that prefix
    (`session.end_profiling()` names it)."""
    ort = require("onnxruntime", "the onnx engine")
    if optimization not in ORT_LEVELS:
        raise OptionError(f"unknown optimization level {optimization!r}; valid: {', '.join(ORT_LEVELS)}")
    level = ort.GraphOptimizationLevel
    options = ort.SessionOptions()
    options.graph_optimization_level = {"none": level.ORT_DISABLE_ALL, "basic": level.ORT_ENABLE_BASIC,
                                        "extended": level.ORT_ENABLE_EXTENDED, "all": level.ORT_ENABLE_ALL}[optimization]
    # Default: as many intra-op threads as torch uses, so the engines compete on equal cores.
    options.intra_op_num_threads = threads or torch.get_num_threads()
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own exception types
        raise RunFolderError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from None


def run_onnx(session, images, batch_size: int, num_classes: int) -> np.ndarray:
    """Logits of uint8 NHWC images; the graph takes the decoded pixels as they are."""
    array = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    outputs = [session.run(["logits"], {INPUT_NAME: np.ascontiguousarray(array[i:i + batch_size])})[0]
               for i in range(0, len(array), batch_size)]
    return np.concatenate(outputs) if outputs else np.empty((0, num_classes), np.float32)


def onnx_labels(path: Path, images: torch.Tensor) -> np.ndarray:
    """Top-1 class of each image by the ONNX graph at `path`."""
    return run_onnx(onnx_session(path), images, 256, 0).argmax(1)


def conv_count(path: Path) -> int:
    import onnx

    return sum(node.op_type == "Conv" for node in onnx.load(str(path)).graph.node)


def export_int8(run_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                max_loss: float = MAX_INT8_ACCURACY_LOSS, calibration: int = CALIBRATION_IMAGES,
                min_agreement: float = MIN_AGREEMENT) -> dict:
    """Write the run's int8 ONNX graph and its sidecar, with the validation accuracy it costs and
    how many labels it changes; refused (nothing written) when every try loses more than `max_loss`.

    Tries INT8_FP32_CONV_TRIES in turn and writes the first within both the accuracy bound and
    `min_agreement` with fp32's labels, so that `--engine auto` can use it; when none agrees that
    well, the first within the accuracy bound (fastest), which `--engine onnx-int8` still runs.
    """
    folder = RunFolder(run_dir)
    fp32_path = fresh_onnx(run_dir)
    data = labelled_training_data(folder)
    if data is None:
        raise RunFolderError(f"{folder.read_config().data_dir}: the run's training data is gone; int8 "
                             "export calibrates on it and measures its accuracy loss on its validation split")
    val, others = (torch.from_numpy(i) for i in split_indices(folder, data, ACCURACY_SAMPLE, calibration))
    val_images, val_targets, calib = data.source.gather(val), data.targets[val].numpy(), data.source.gather(others)
    if len(val_images) == 0:
        raise ImgclsError(f"{folder.path}: the run has no validation split to measure int8 accuracy on")
    out = Path(out) if out else folder.export_path("onnx-int8")
    full_range = cpu_has_vnni()
    reference = onnx_labels(fp32_path, val_images)
    before = float((reference == val_targets).mean())
    quantization = {"format": "QDQ", "per_channel": True, "weight_bits": 8 if full_range else 7,
                    "weights": "int8, 8-bit range (VNNI)" if full_range else "int8, 7-bit range (no VNNI)",
                    "activations": "uint8", "calibration_images": len(calib), "validation_images": len(val_images),
                    "validation_accuracy_fp32": round(before, 6), "max_loss_points": 100 * max_loss,
                    "min_agreement": min_agreement, "tries": []}
    tries, convs = quantization["tries"], conv_count(fp32_path)
    with tempfile.TemporaryDirectory() as tmp:
        kept = None  # (try, graph file) to write: the first within the bound, or the first that also agrees
        for fp32_convs in (n for n in INT8_FP32_CONV_TRIES if n == 0 or n < convs):
            candidate = Path(tmp) / f"fp32-convs-{fp32_convs}.onnx"
            quantize_int8(fp32_path, candidate, calib, full_range, fp32_convs)
            labels = onnx_labels(candidate, val_images)
            after = float((labels == val_targets).mean())
            tries.append({"fp32_convs": fp32_convs, "validation_accuracy_int8": round(after, 6),
                          "accuracy_loss_points": round(100 * (before - after), 3),
                          "agreement": round(float((labels == reference).mean()), 6)})
            if before - after > max_loss:
                continue
            agrees = tries[-1]["agreement"] >= min_agreement
            if kept is None or agrees:
                kept = (tries[-1], candidate)
            if agrees:
                break
        if kept is None:
            first, *retries = tries
            also = "".join(f"; {t['accuracy_loss_points']:.2f} with the first {t['fp32_convs']} convolutions in fp32"
                           for t in retries)
            raise ImgclsError(f"{folder.path}: int8 loses {first['accuracy_loss_points']:.2f} points of validation "
                              f"accuracy (from {before:.4f} on {len(val_images)} images{also}), more than the "
                              f"{100 * max_loss:g}-point bound; "
                              "not exported (use the fp32 ONNX graph)")
        chosen, graph = kept
        quantization.update(chosen)
        out.parent.mkdir(parents=True, exist_ok=True)
        with fileio.atomic_path(out) as target:
            target.write_bytes(graph.read_bytes())
    meta = {**read_sidecar(fp32_path), "quantization": quantization}
    fileio.write_json(sidecar_path(out), meta)
    return {**meta, "path": str(out), "sidecar": str(sidecar_path(out))}
