"""--engine auto: measures the candidates, records the choice next to the model, never picks an engine
whose predictions leave the tolerance; int8 export stays within its accuracy bound."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deploy_support import train_tiny_run
from imgcls import engines, fileio
from imgcls.cli import main
from imgcls.errors import ImgclsError
from imgcls.export import export_int8, labelled_training_data, sidecar_path, split_indices
from imgcls.predict import OnnxPredictor, Predictor, load_predictor
from imgcls.train.run_folder import RunFolder

NUM_CLASSES = 3  # the synthetic glyph dataset's


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return train_tiny_run(tmp_path_factory.mktemp("engines"))


@pytest.fixture(scope="module")
def confident_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Trained long enough that its class margins exceed int8 rounding (3 epochs leave near-ties)."""
    return train_tiny_run(tmp_path_factory.mktemp("int8"), epochs=15)


class Clock:
    """A clock that moves only when a fake engine computes: timing without depending on speed."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeEngine:
    """Labels from the pixels (a fixed rule), optionally shifted to disagree; costs `seconds_per_image`."""

    def __init__(self, clock: Clock, seconds_per_image: float, shift: int = 0, seconds_per_batch: float = 0.0):
        self.clock, self.cost, self.shift, self.per_batch = clock, seconds_per_image, shift, seconds_per_batch

    def predict_proba(self, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
        self.clock.now += self.cost * len(images) + self.per_batch * -(-len(images) // batch_size)
        labels = (images.reshape(len(images), -1).float().mean(1).long() + self.shift) % NUM_CLASSES
        return np.eye(NUM_CLASSES, dtype=np.float32)[labels.numpy()]


def fakes(clock: Clock, costs: dict[str, float], shifts: dict[str, int] | None = None, built: list | None = None,
          per_batch: dict[str, float] | None = None):
    """Factories for fake engines; `built` collects the names of the engines actually built."""
    shifts, per_batch = shifts or {}, per_batch or {}

    def factory(name):
        def build():
            if built is not None:
                built.append(name)
            return FakeEngine(clock, costs[name], shifts.get(name, 0), per_batch.get(name, 0.0))
        return build
    return {name: factory(name) for name in costs}


def run_auto(run: Path, factories: dict, clock: Clock) -> tuple[object, dict]:
    return engines.auto_engine(run, factories, "cpu", clock=clock, names=list(factories))


def test_auto_records_every_measured_speed_the_choice_and_the_cpu_flags(tiny_run) -> None:
    run, _ = tiny_run
    (run / RunFolder.ENGINE).unlink(missing_ok=True)
    clock = Clock()
    costs = {"torch": 4e-3, "onnx": 1e-3, "onnx-int8": 2e-3}
    lines = []
    _, record = engines.auto_engine(run, fakes(clock, costs), "cpu", clock=clock, names=list(costs), log=lines.append)
    saved = fileio.read_json(run / RunFolder.ENGINE)
    assert saved["engine"] == record["engine"] == "onnx"  # 1 ms an image: the fastest
    assert {name: m["images_per_s"] for name, m in saved["measured"].items()} == \
        pytest.approx({"torch": 250.0, "onnx": 1000.0, "onnx-int8": 500.0})
    assert all(m["passed"] and m["agreement"] == 1.0 for m in saved["measured"].values())
    assert saved["cpu"] == engines.cpu_signature(torch.device("cpu"))
    assert saved["weights_sha256"] == RunFolder(run).weights_sha256()
    assert saved["sample"]["images"] > 0 and "validation split" in saved["sample"]["source"]
    assert len(lines) == 1 and "engine auto: onnx" in lines[0] and "1,000 img/s" in lines[0]


def test_a_server_gets_the_engine_fastest_over_its_batch_sizes_not_over_large_batches(tiny_run) -> None:
    run, _ = tiny_run
    for name in (RunFolder.ENGINE, RunFolder.ENGINE_SERVE):
        (run / name).unlink(missing_ok=True)
    clock = Clock()
    # bf16-like: 0.5 ms an image but 20 ms a call; onnx-like: 1 ms an image, 1 ms a call.
    factories = fakes(clock, {"torch": 4e-3, "torch-bf16": 5e-4, "onnx": 1e-3},
                      per_batch={"torch-bf16": 20e-3, "onnx": 1e-3})
    _, batch = engines.auto_engine(run, factories, "cpu", clock=clock, names=list(factories))
    _, served = engines.auto_engine(run, factories, "cpu", clock=clock, names=list(factories), serving_batch=32)
    n = served["sample"]["images"]
    assert 32 < n <= 64  # one batch of the sample at 512 images, two at 32: the figures below
    assert batch["engine"] == "torch-bf16" and batch["batch_sizes"] == [512]  # (0.5 n + 20) vs (n + 1) ms
    assert served["engine"] == "onnx" and served["batch_sizes"] == [1, 32]  # 20.5 ms vs 2 ms one at a time
    by_batch = served["measured"]["torch-bf16"]["images_per_s_by_batch"]
    assert by_batch == pytest.approx({"1": 1 / 20.5e-3, "32": n / (5e-4 * n + 2 * 20e-3)}, rel=1e-3)
    assert served["measured"]["torch-bf16"]["images_per_s"] == pytest.approx(
        2 / sum(1 / v for v in by_batch.values()), rel=1e-3)  # the harmonic mean ranks engines
    # Each choice has its own record, so serving and predicting do not measure over each other.
    assert fileio.read_json(run / RunFolder.ENGINE)["engine"] == "torch-bf16"
    assert fileio.read_json(run / RunFolder.ENGINE_SERVE)["engine"] == "onnx"
    built = []
    again = fakes(clock, {"torch": 4e-3, "torch-bf16": 5e-4, "onnx": 1e-3}, built=built)
    engines.auto_engine(run, again, "cpu", clock=clock, names=list(again))
    engines.auto_engine(run, again, "cpu", clock=clock, names=list(again), serving_batch=32)
    assert built == ["torch-bf16", "onnx"]  # both read back, nothing measured again


def test_auto_reuses_the_record_on_the_same_cpu_and_measures_again_on_another(tiny_run, monkeypatch) -> None:
    run, _ = tiny_run
    (run / RunFolder.ENGINE).unlink(missing_ok=True)
    clock, built = Clock(), []
    factories = fakes(clock, {"torch": 4e-3, "onnx": 1e-3}, built=built)
    run_auto(run, factories, clock)
    assert built == ["torch", "onnx"]
    built.clear()
    _, record = run_auto(run, factories, clock)
    assert built == ["onnx"] and record["engine"] == "onnx"  # only the recorded engine is loaded
    other_cpu = {"model": "another CPU", "flags": ["avx2", "avx512_bf16", "amx_bf16"]}
    monkeypatch.setattr(engines, "cpu_signature", lambda device: other_cpu)
    built.clear()
    _, record = run_auto(run, factories, clock)
    assert built == ["torch", "onnx"] and record["cpu"] == other_cpu
    assert fileio.read_json(run / RunFolder.ENGINE)["cpu"] == other_cpu


def test_auto_never_picks_an_engine_that_disagrees_with_fp32_however_fast(tiny_run) -> None:
    run, _ = tiny_run
    (run / RunFolder.ENGINE).unlink(missing_ok=True)
    clock = Clock()
    factories = fakes(clock, {"torch": 4e-3, "onnx": 2e-3, "onnx-int8": 1e-4}, shifts={"onnx-int8": 1})
    predictor, record = run_auto(run, factories, clock)
    assert record["engine"] == "onnx" and predictor.cost == 2e-3
    refused = record["measured"]["onnx-int8"]
    assert refused["passed"] is False and refused["agreement"] == 0.0 and "agreement" in refused["reason"]
    assert refused["accuracy_loss_points"] > 0.5


def test_an_engine_that_cannot_be_built_is_refused_with_its_reason(tiny_run) -> None:
    run, _ = tiny_run
    (run / RunFolder.ENGINE).unlink(missing_ok=True)
    clock = Clock()
    factories = fakes(clock, {"torch": 4e-3})

    def refuse():
        raise ImgclsError("int8 loses 2.00 points of validation accuracy")
    factories["onnx-int8"] = refuse
    _, record = run_auto(run, factories, clock)
    assert record["engine"] == "torch"
    assert record["measured"]["onnx-int8"] == {"passed": False, "reason": "int8 loses 2.00 points of validation accuracy"}


def test_judge_bounds_the_accuracy_loss_on_labelled_images() -> None:
    reference = np.eye(2)[[0, 1] * 100]
    targets = torch.tensor([0, 1] * 100)
    one_wrong, two_wrong = reference.copy(), reference.copy()
    one_wrong[0], two_wrong[:2] = [0, 1], [[0, 1], [1, 0]]  # 0.5 and 1.0 points on 200 images
    tolerance = engines.Tolerance(max_accuracy_loss=0.005, min_agreement=0.9)
    assert engines.judge(one_wrong, reference, targets, tolerance)["passed"]
    verdict = engines.judge(two_wrong, reference, targets, tolerance)
    assert not verdict["passed"] and verdict["accuracy_loss_points"] == 1.0 and "1.00 accuracy points" in verdict["reason"]


def test_without_fast_bf16_or_labelled_data_only_exact_engines_are_candidates(monkeypatch) -> None:
    monkeypatch.setattr(engines, "cpu_has_fast_bf16", lambda: False)
    names, skipped = engines.candidates(torch.device("cpu"), labelled=True)
    assert names == ["torch", "onnx", "onnx-int8"] and "AVX512-BF16" in skipped["torch-bf16"]
    monkeypatch.setattr(engines, "cpu_has_fast_bf16", lambda: True)
    names, skipped = engines.candidates(torch.device("cpu"), labelled=False)
    assert names == ["torch", "onnx"] and set(skipped) == {"torch-bf16", "onnx-int8"}


def test_real_auto_measures_every_engine_and_predicts_with_the_fastest_that_passed(tiny_run, tmp_path) -> None:
    """End to end on a real run: every CPU engine is measured (or refused with its reason), the
    fastest that passed is chosen, and the submission is that engine's."""
    run, data = tiny_run
    (run / RunFolder.ENGINE).unlink(missing_ok=True)
    assert main(["predict", str(run), str(data / "test"), "--out", str(tmp_path / "auto.csv"), "--device", "cpu"]) == 0
    record = fileio.read_json(run / RunFolder.ENGINE)
    measured = record["measured"]
    assert {"torch", "onnx", "onnx-int8"} <= set(measured) and measured["torch"]["passed"]
    passed = {name: m["images_per_s"] for name, m in measured.items() if m["passed"]}
    assert record["engine"] == max(passed, key=passed.get)
    forced = tmp_path / "forced.csv"
    assert main(["predict", str(run), str(data / "test"), "--out", str(forced), "--device", "cpu",
                 "--engine", record["engine"]]) == 0
    assert (tmp_path / "auto.csv").read_text() == forced.read_text()


def test_int8_export_stays_within_its_accuracy_bound(confident_run) -> None:
    run, _ = confident_run
    result = export_int8(run)
    q = result["quantization"]
    assert q["accuracy_loss_points"] <= 0.5 and q["validation_images"] > 0 and q["calibration_images"] > 0
    folder = RunFolder(run)
    data = labelled_training_data(folder)
    everything = data.images
    fp32 = OnnxPredictor.from_run(run).predict(everything)
    int8 = OnnxPredictor.from_export(result["path"]).predict(everything)
    eager = Predictor.from_run(run, device="cpu", precision="fp32").predict(everything)
    assert (fp32 == eager).all()
    assert (int8 == fp32).mean() >= 0.98  # the same bound --engine auto applies
    assert load_predictor(run, engine="onnx-int8").engine == "onnx-int8"


def test_int8_export_is_refused_beyond_the_bound_and_writes_nothing(confident_run) -> None:
    run, _ = confident_run
    out = run / "refused.int8.onnx"
    with pytest.raises(ImgclsError, match="points of validation accuracy"):
        export_int8(run, out, max_loss=-1.0)  # no graph can lose less than nothing
    assert not out.exists() and not sidecar_path(out).exists()


def test_calibration_never_sees_a_validation_image(tiny_run) -> None:
    run, _ = tiny_run
    folder = RunFolder(run)
    data = labelled_training_data(folder)
    val, others = split_indices(folder, data, 1000, 1000)
    assert {data.ids[i] for i in val} == set(folder.read_split()["val_ids"])
    assert not set(val) & set(others) and len(val) + len(others) == len(data.ids)


def weight_inputs_quantised(graph_path: Path) -> list[bool]:
    """For each Conv of an int8 graph, in order: whether its weights come through a DequantizeLinear."""
    import onnx

    graph = onnx.load(str(graph_path)).graph
    dequantised = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return [node.input[1] in dequantised for node in graph.node if node.op_type == "Conv"]


def validation_targets(run: Path) -> np.ndarray:
    """The validation targets export_int8 measures on, in its order."""
    import imgcls.export as export

    folder = RunFolder(run)
    data = labelled_training_data(folder)
    val, _ = split_indices(folder, data, export.ACCURACY_SAMPLE, export.CALIBRATION_IMAGES)
    return data.targets[val].numpy()


def relabelled(targets: np.ndarray, rows: slice) -> np.ndarray:
    """`targets` with `rows` moved to the next class: labels wrong exactly there."""
    labels = targets.copy()
    labels[rows] = (labels[rows] + 1) % NUM_CLASSES
    return labels


def fake_graph_labels(monkeypatch, labels: list[np.ndarray]) -> None:
    """export_int8 sees `labels` in turn: the fp32 graph's, then each try's."""
    import imgcls.export as export

    answers = iter(labels)
    monkeypatch.setattr(export, "onnx_labels", lambda *_: next(answers))


def test_int8_keeps_the_first_convolutions_in_fp32_until_it_keeps_both_accuracy_and_fp32s_labels(
        confident_run, monkeypatch, tmp_path: Path) -> None:
    run, _ = confident_run
    import imgcls.export as export

    whole = export_int8(run, tmp_path / "whole.onnx", max_loss=1.0, min_agreement=0.0)  # any try passes: the first
    assert whole["quantization"]["fp32_convs"] == 0 and len(whole["quantization"]["tries"]) == 1
    assert all(weight_inputs_quantised(tmp_path / "whole.onnx"))

    monkeypatch.setattr(export, "INT8_FP32_CONV_TRIES", (0, 1, 2))  # the tiny model has 5 convolutions
    targets = validation_targets(run)
    n = len(targets)
    fp32 = relabelled(targets, slice(0, 1))  # wrong on the first image
    lossy = relabelled(targets, slice(0, n // 2 + 1))  # beyond the bound
    swapped = relabelled(targets, slice(1, 2))  # as accurate as fp32, two of its labels changed
    assert n >= 3 and (n - 2) / n < 0.98

    def points_lost(labels: np.ndarray) -> str:
        return f"{100 * ((fp32 == targets).mean() - (labels == targets).mean()):.2f}"

    fake_graph_labels(monkeypatch, [fp32, lossy, swapped, fp32.copy()])
    third = export_int8(run, tmp_path / "third.onnx")["quantization"]
    assert [t["fp32_convs"] for t in third["tries"]] == [0, 1, 2]
    assert third["tries"][1]["accuracy_loss_points"] == 0.0 and third["tries"][1]["agreement"] < 0.98
    assert third["fp32_convs"] == 2 and third["agreement"] == 1.0
    kept = weight_inputs_quantised(tmp_path / "third.onnx")
    assert kept[:2] == [False, False] and all(kept[2:])

    # No try keeps 98% of the labels: the fastest within the accuracy bound is written (auto refuses it).
    fake_graph_labels(monkeypatch, [fp32, lossy, swapped, swapped.copy()])
    fastest = export_int8(run, tmp_path / "fastest.onnx")["quantization"]
    assert len(fastest["tries"]) == 3 and fastest["fp32_convs"] == 1 and fastest["agreement"] < 0.98

    two_wrong = relabelled(targets, slice(0, 2))
    fake_graph_labels(monkeypatch, [fp32, lossy, lossy, two_wrong])
    with pytest.raises(ImgclsError, match=rf"loses {points_lost(lossy)} points .*; {points_lost(lossy)} with the "
                                          rf"first 1 convolutions in fp32; {points_lost(two_wrong)} with the first 2 "
                                          r"convolutions in fp32\)"):
        export_int8(run, tmp_path / "refused.onnx")
    assert not (tmp_path / "refused.onnx").exists()


def test_int8_weights_use_the_range_this_cpus_kernels_need_and_are_redone_on_another(
        confident_run, monkeypatch) -> None:
    run, _ = confident_run
    import imgcls.export as export

    path = RunFolder(run).export_path("onnx-int8")
    # Accuracy is not what this test is about (8-bit weights may saturate on a CPU without VNNI).
    monkeypatch.setattr(export, "onnx_labels", lambda *_: validation_targets(run))
    monkeypatch.setattr(export, "cpu_has_vnni", lambda: False)
    OnnxPredictor.from_run_int8(run)
    meta = fileio.read_json(sidecar_path(path))["quantization"]
    assert meta["weight_bits"] == 7 and export.int8_suits_this_cpu(path)
    made = path.stat().st_mtime_ns
    OnnxPredictor.from_run_int8(run)  # same CPU: reused
    assert path.stat().st_mtime_ns == made
    monkeypatch.setattr(export, "cpu_has_vnni", lambda: True)  # a VNNI machine: 8-bit weights, quantised again
    assert not export.int8_suits_this_cpu(path)
    OnnxPredictor.from_run_int8(run)
    assert fileio.read_json(sidecar_path(path))["quantization"]["weight_bits"] == 8 and export.int8_suits_this_cpu(path)


@pytest.mark.parametrize("flags, named", [({"avx2", "avx512_bf16", "amx_bf16", "amx_int8"}, True),
                                          ({"avx2", "avx512_bf16", "avx512_vnni"}, False)])
def test_the_cpu_kind_line_names_intels_matrix_units_only_where_the_cpu_has_them(monkeypatch, flags, named) -> None:
    from imgcls import runtime
    monkeypatch.setattr(runtime, "cpu_info", lambda: ("Some Xeon", flags))
    line = runtime.cpu_kind()
    assert line.startswith("Some Xeon, AVX512-BF16") and ("AMX" in line) == named and ", VNNI," in line
