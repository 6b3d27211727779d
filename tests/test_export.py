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


def test_tf_same_padding_is_fixed_in_the_graph_and_fused_into_its_convolutions(tmp_path: Path, tiny_run) -> None:
    """EfficientNet-Lite's stride-2 convolutions pad TF-style ("same", asymmetric at even sizes): the
    graph computes what PyTorch computes, and ONNX Runtime can fold every Pad into its convolution
    (a Pad whose amounts are computed from the input's shape at run time stays, and costs time)."""
    import onnxruntime as ort
    from timm.layers.conv2d_same import Conv2dSame

    from imgcls.models import create_model

    _, data = tiny_run
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_classes=3, in_chans=3).eval()
    assert any(isinstance(m, Conv2dSame) for m in model.modules())
    run = write_run_folder(tmp_path / "lite0", "efficientnet_lite0", model, ["bar", "circle", "square"], in_chans=3,
                           data_channels=1, data_size=(16, 16), image_size=(36, 36),
                           mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    images = Predictor.from_run(run, device="cpu").load(data / "test").images
    torch_logits, onnx_logits = parity(run, images)
    assert float(np.abs(torch_logits - onnx_logits).max()) < 1e-4 * max(1.0, float(np.abs(torch_logits).max()))
    exported = onnx.load(str(run / "model.onnx")).graph.node
    assert not [n for n in exported if n.op_type == "Ceil"]  # no padding worked out from shapes at run time
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(run / "model.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "Pad" not in optimized and optimized.count("Conv") == 49


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


@pytest.mark.parametrize("stale", [{"weights_sha256": "0" * 64}, {"graph_revision": None}],
                         ids=["other weights", "earlier graph builder"])
def test_stale_export_is_rebuilt(tiny_run, tmp_path: Path, stale: dict) -> None:
    run, _ = tiny_run
    export_onnx(run, run / "model.onnx")
    meta = json.loads(sidecar_path(run / "model.onnx").read_text())
    sidecar_path(run / "model.onnx").write_text(json.dumps({**meta, **stale}))
    OnnxPredictor.from_run(run)
    assert json.loads(sidecar_path(run / "model.onnx").read_text()) == meta


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


def glyph_images(size: int, count: int = 6) -> torch.Tensor:
    """Decoded-like uint8 NHWC grey glyphs of the given size, all three kinds."""
    from conftest import draw

    rng = np.random.default_rng(size)
    return torch.from_numpy(np.stack([draw(i % 3, rng, size) for i in range(count)])[..., None])


def calibrated(model: torch.nn.Module, images: torch.Tensor, side: int) -> torch.nn.Module:
    """A random-init model made to tell the glyphs apart without training: BatchNorm statistics from
    the images, then the head solved by least squares on its features (`glyph_images` cycles the
    three kinds), so predictions are neither one constant class nor near ties."""
    x = torch.nn.functional.interpolate((images.permute(0, 3, 1, 2).float() / 255 - 0.2) / 0.3, size=side)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the calibration batch
    with torch.no_grad():
        model.train()(x)
        features = model.eval().forward_head(model.forward_features(x), pre_logits=True)
        targets = torch.eye(3)[torch.arange(len(x)) % 3] * 10
        solution = torch.linalg.lstsq(torch.cat([features, torch.ones(len(x), 1)], 1), targets).solution
        model.fc.weight.copy_(solution[:-1].T)
        model.fc.bias.copy_(solution[-1])
    return model


def default_cnn_run(root: Path, data_side: int, model_side: int | None = None) -> Path:
    """The default scratch-cnn (random init, calibrated on the glyphs) as a run folder."""
    from imgcls.models import create_model

    torch.manual_seed(data_side)
    model = calibrated(create_model("scratch-cnn", num_classes=3, in_chans=1), glyph_images(data_side),
                       model_side or data_side)
    return write_run_folder(root, "scratch-cnn", model, ["bar", "circle", "square"], in_chans=1,
                            data_channels=1, data_size=(data_side, data_side),
                            image_size=(model_side, model_side) if model_side else None, mean=[0.2], std=[0.3])


@pytest.mark.parametrize("data_side,model_side", [(16, None), (28, None), (40, None), (64, None),
                                                  (23, None), (28, 100), (40, 256)])
def test_default_cnn_exports_at_any_input_size(tmp_path: Path, data_side: int, model_side: int | None) -> None:
    """Same labels, probabilities within 1e-5 between ONNX Runtime and eager PyTorch, at sizes where
    the 7x7 grid pooling is not a whole division of the feature map."""
    run = default_cnn_run(tmp_path / "run", data_side, model_side)
    images = glyph_images(data_side)
    eager = Predictor.from_run(run, device="cpu", precision="fp32")
    onnx_run = OnnxPredictor.from_export(export_onnx(run)["path"])
    p_eager, p_onnx = eager.predict_proba(images), onnx_run.predict_proba(images)
    assert np.abs(p_eager - p_onnx).max() < 1e-5
    assert (eager.predict(images) == onnx_run.predict(images)).all()
    assert len(set(p_eager.argmax(1).tolist())) > 1  # not agreement on a constant


@pytest.mark.parametrize("grid", [7, 1])
def test_grid_pooling_in_exported_graphs_computes_what_adaptive_pooling_does(grid: int) -> None:
    from imgcls.models.scratch import GridAvgPool

    torch.manual_seed(0)
    for side in (2, 4, 7, 8, 10, 16, 23, 32, 64):
        x = torch.randn(2, 5, side, side + 3)
        expected = torch.nn.functional.adaptive_avg_pool2d(x, grid)
        assert torch.allclose(GridAvgPool(grid).as_matrix_products(x), expected, atol=1e-6), side
        assert torch.equal(GridAvgPool(grid)(x), expected)  # eager: adaptive pooling itself


def test_scratch_cnn_state_dicts_are_unchanged_by_the_grid_pooling() -> None:
    from imgcls.models import create_model

    for name, grid in (("scratch-cnn", 7), ("scratch-cnn-tiny", 1)):
        new = create_model(name, num_classes=3, in_chans=1)
        old = create_model(name, num_classes=3, in_chans=1)
        old.pool[0] = torch.nn.AdaptiveAvgPool2d(grid)
        assert old.state_dict().keys() == new.state_dict().keys()


def test_run_folder_trained_with_adaptive_pooling_still_loads_and_exports(tmp_path: Path) -> None:
    from imgcls.models import create_model

    torch.manual_seed(1)
    old = create_model("scratch-cnn", num_classes=3, in_chans=1).eval()
    old.pool[0] = torch.nn.AdaptiveAvgPool2d(7)
    with torch.no_grad():
        old.fc.weight.mul_(50)
    run = write_run_folder(tmp_path / "old", "scratch-cnn", old, ["bar", "circle", "square"], in_chans=1,
                           data_channels=1, data_size=(40, 40), image_size=None, mean=[0.2], std=[0.3])
    images = glyph_images(40)
    with torch.no_grad():
        expected = torch.softmax(old((images.permute(0, 3, 1, 2).float() / 255 - 0.2) / 0.3), 1).numpy()
    assert np.abs(Predictor.from_run(run, device="cpu").predict_proba(images) - expected).max() < 1e-5
    onnx_proba = OnnxPredictor.from_export(export_onnx(run)["path"]).predict_proba(images)
    assert np.abs(onnx_proba - expected).max() < 1e-5
