"""ONNX export: the graph (preprocessing included) computes what PyTorch computes, on real decoded images."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch

from deploy_support import train_tiny_run, write_run_folder
from imgcls.cli import main
from imgcls.config import TrainConfig
from imgcls.errors import RunFolderError
from imgcls.export import export_onnx, export_run, sidecar_path
from imgcls.models import get_spec
from imgcls.models.registry import ModelSpec, register_model
from imgcls.predict import OnnxPredictor, Predictor, predict_folder

LOCAL_TIMM = "test-timm-resnet18"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return train_tiny_run(tmp_path_factory.mktemp("export"))


def timm_registry_name() -> str:
    """A timm backbone through the registry; registered here only if the registry has none yet."""
    for name in ("tf_efficientnet_lite0", "efficientnet-lite0", "resnet18"):
        try:
            if get_spec(name).family == "timm":
                return name
        except ValueError:
            continue
    try:
        get_spec(LOCAL_TIMM)
    except ValueError:
        register_model(ModelSpec(LOCAL_TIMM, lambda num_classes, in_chans=3, **kw: timm.create_model(
            "resnet18", pretrained=False, num_classes=num_classes, in_chans=in_chans), "timm resnet18", "timm"))
    return LOCAL_TIMM


def parity(run: Path, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Logits from eager PyTorch (fp32) and from ONNX Runtime on the exported graph."""
    torch_logits = Predictor.from_run(run, device="cpu", precision="fp32").predict_logits(images)
    onnx_logits = OnnxPredictor.from_export(export_onnx(run)["path"]).predict_logits(images)
    return torch_logits, onnx_logits


def test_scratch_cnn_parity_on_real_images(tiny_run) -> None:
    run, data = tiny_run
    images = Predictor.from_run(run, device="cpu").load(data / "test").images
    assert images.dtype == torch.uint8 and images.shape == (30, 16, 16, 1)
    torch_logits, onnx_logits = parity(run, images)
    diff = float(np.abs(torch_logits - onnx_logits).max())
    print(f"\nscratch-cnn-tiny parity: max abs logit diff {diff:.2e} over {len(images)} images")
    assert diff < 1e-4
    assert (torch_logits.argmax(1) == onnx_logits.argmax(1)).all()
    # The model learned something, so argmax agreement is not agreement on a constant.
    assert len(set(torch_logits.argmax(1).tolist())) == 3


def test_timm_backbone_parity_with_resize_and_grey_to_rgb(tmp_path: Path, tiny_run) -> None:
    """Grey 16x16 data into an RGB 32x32 backbone: expansion and bilinear resize run inside the graph."""
    _, data = tiny_run
    name = timm_registry_name()
    from imgcls.models import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_chans=3).eval()
    run = write_run_folder(tmp_path / "timm", name, model, ["bar", "circle", "square"], in_chans=3,
                           data_channels=1, data_size=(16, 16), image_size=(32, 32),
                           mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    images = Predictor.from_run(run, device="cpu").load(data / "test").images
    torch_logits, onnx_logits = parity(run, images)
    scale = float(np.abs(torch_logits).max())
    diff = float(np.abs(torch_logits - onnx_logits).max())
    print(f"\n{name} parity: max abs logit diff {diff:.2e} (logit scale {scale:.2f}) over {len(images)} images")
    assert diff < 1e-4 * max(1.0, scale)
    assert (torch_logits.argmax(1) == onnx_logits.argmax(1)).all()


def test_sidecar_describes_input_classes_and_source(tiny_run, tmp_path: Path) -> None:
    run, _ = tiny_run
    out = tmp_path / "deploy" / "glyphs.onnx"
    result = export_onnx(run, out)
    meta = json.loads(sidecar_path(out).read_text())
    config = TrainConfig.from_json(json.loads((run / "config.json").read_text()))
    assert meta["config_hash"] == config.hash() == json.loads((run / "run.json").read_text())["config_hash"]
    assert meta["input"] == {"name": "images", "dtype": "uint8", "layout": "NHWC", "shape": ["batch", 16, 16, 1]}
    assert meta["classes"]["labels"] == ["bar", "circle", "square"]
    assert len(meta["mean"]) == len(meta["std"]) == 1 and 0 < meta["std"][0] < 1
    assert result["path"] == str(out)
    graph = onnx.load(str(out))
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input] == ["images"]
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    # The batch axis is symbolic: one export serves any batch size.
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_torchscript_export_matches_eager(tiny_run, tmp_path: Path) -> None:
    run, data = tiny_run
    predictor = Predictor.from_run(run, device="cpu", precision="fp32")
    images = predictor.load(data / "test").images
    result = export_run(run, tmp_path / "model.pt", "torchscript")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch marks jit deprecated; loading still works
        logits, probabilities = torch.jit.load(result["path"])(images)
    assert np.abs(logits.numpy() - predictor.predict_logits(images)).max() < 1e-4
    assert torch.allclose(probabilities.sum(1), torch.ones(len(images)))


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_predict_engines_write_the_same_submission(tiny_run, tmp_path: Path) -> None:
    run, data = tiny_run
    (run / "model.onnx").unlink(missing_ok=True)
    torch_csv, onnx_csv = tmp_path / "torch.csv", tmp_path / "onnx.csv"
    assert main(["predict", str(run), str(data / "test"), "--out", str(torch_csv), "--engine", "torch"]) == 0
    assert main(["predict", str(run), str(data / "test"), "--out", str(onnx_csv), "--engine", "onnx"]) == 0
    assert (run / "model.onnx").is_file()  # exported on first use, kept for the next
    assert torch_csv.read_bytes() == onnx_csv.read_bytes()
    rows = read_rows(onnx_csv)
    assert rows[0] == ["id", "label"] and len(rows) == 31
    assert {r[1] for r in rows[1:]} <= {"bar", "circle", "square"}
    # Predicting straight from an exported file (no run folder needed) gives the same rows.
    from_file = predict_folder(run / "model.onnx", data / "test", tmp_path / "file.csv", engine="onnx")
    assert from_file["rows"] == 30 and (tmp_path / "file.csv").read_bytes() == onnx_csv.read_bytes()


def test_stale_export_is_rebuilt_after_weights_change(tiny_run, tmp_path: Path) -> None:
    run, _ = tiny_run
    export_onnx(run, run / "model.onnx")
    meta = json.loads(sidecar_path(run / "model.onnx").read_text())
    sidecar_path(run / "model.onnx").write_text(json.dumps({**meta, "weights_sha256": "0" * 64}))
    OnnxPredictor.from_run(run)
    assert json.loads(sidecar_path(run / "model.onnx").read_text())["weights_sha256"] == meta["weights_sha256"]


def test_export_errors_are_one_line(tiny_run, tmp_path: Path, capsys) -> None:
    run, _ = tiny_run
    assert main(["export", str(tmp_path / "nope"), "--format", "onnx"]) == 4
    assert "not a finished run folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse lists the valid formats and exits 2
        main(["export", str(run), "--format", "tflite"])
    good = Path(export_onnx(run, tmp_path / "good.onnx")["path"])
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(good.read_bytes())
    with pytest.raises(RunFolderError, match="sidecar JSON missing"):
        OnnxPredictor.from_export(lonely)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a graph")
    sidecar_path(garbage).write_text(sidecar_path(good).read_text())
    with pytest.raises(RunFolderError, match="ONNX Runtime cannot load it"):
        OnnxPredictor.from_export(garbage)
