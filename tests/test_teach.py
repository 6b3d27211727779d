"""The professor teaches the student: ensembles of runs, and distillation into a small model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import make_csv_dataset
from deploy_support import write_run_folder
from imgcls.cli import main
from imgcls.config import TrainConfig
from imgcls.data.transforms import Preprocess
from imgcls.ensemble import build_ensemble, fit_weights
from imgcls.predict import mix
from imgcls.errors import RunFolderError
from imgcls.evaluate.scoring import evaluate_run
from imgcls.export import export_onnx
from imgcls.predict import OnnxPredictor, load_predictor
from imgcls.runtime import make_runtime
from imgcls.train.distill import distillation_targets
from imgcls.train.loop import train_one_epoch
from imgcls.train.run_folder import RunFolder
from imgcls.train.runner import fit


def tiny_config(data, **changes) -> TrainConfig:
    base = dict(data_dir=str(data / "train"), model="scratch-cnn-tiny", epochs=2, batch_size=16, lr=0.01,
                precision="fp32", channels_last=False)
    return TrainConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two members trained differently on one split (same seed), the dataset and a home for caches."""
    root = tmp_path_factory.mktemp("teach")
    data = make_csv_dataset(root / "ds", n_per_class=16, n_test=30, string_labels=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMGCLS_HOME", str(root / "imgcls_home"))
        fit(tiny_config(data, epochs=3), root / "a", device="cpu", log=lambda _: None)
        fit(tiny_config(data, lr=0.003), root / "b", device="cpu", log=lambda _: None)
    return {"root": root, "data": data, "a": root / "a", "b": root / "b"}


@pytest.fixture
def home(runs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGCLS_HOME", str(runs["root"] / "imgcls_home"))


def test_an_ensemble_is_the_mean_of_its_members_everywhere(runs: dict, home, tmp_path) -> None:
    out = tmp_path / "ens"
    run = build_ensemble([runs["a"], runs["b"]], out, device="cpu", log=lambda _: None)
    members = [load_predictor(runs[k], device="cpu") for k in ("a", "b")]
    ensemble = load_predictor(out, device="cpu")
    test = ensemble.load(runs["data"] / "test")
    expected = np.mean([m.predict_proba(test.images) for m in members], axis=0)
    proba = ensemble.predict_proba(test.images)
    np.testing.assert_allclose(proba, expected, atol=1e-6)
    assert [m["weight"] for m in run["members"]] == [0.5, 0.5]
    assert run["model"]["name"] == "ensemble" and RunFolder(out).is_complete()

    # predict and evaluate take the folder like any run
    # Eager fp32, as the expected labels: `--engine auto` picks by measured speed, and on a busy
    # machine it chose a lossy engine whose label for a near-tie differed.
    assert main(["predict", str(out), str(runs["data"] / "test"), "--out", str(tmp_path / "sub.csv"),
                 "--device", "cpu", "--engine", "torch"]) == 0
    rows = (tmp_path / "sub.csv").read_text().splitlines()[1:]
    assert [r.split(",")[1] for r in rows] == ensemble.classes.decode(expected.argmax(1))
    metrics = evaluate_run(out, runs["data"] / "test", runs["data"] / "test_labels.csv", device="cpu")
    truth = np.array(ensemble.classes.encode([line.split(",")[1] for line in
                                              (runs["data"] / "test_labels.csv").read_text().splitlines()[1:]]))
    assert metrics["accuracy"] == pytest.approx(float((expected.argmax(1) == truth).mean()))

    # one ONNX graph holding both members
    exported = export_onnx(out)
    onnx_proba = OnnxPredictor.from_export(exported["path"]).predict_proba(test.images)
    np.testing.assert_allclose(onnx_proba, expected, atol=1e-5)


def test_the_server_answers_with_the_ensemble(runs: dict, home, tmp_path) -> None:
    from fastapi.testclient import TestClient

    from imgcls.serve.app import create_app

    out = tmp_path / "ens"
    build_ensemble([runs["a"], runs["b"]], out, device="cpu", log=lambda _: None)
    predictor = load_predictor(out, device="cpu")
    image = runs["data"] / "test" / "images" / "te0000.png"
    expected = predictor.predict_proba(predictor.load(runs["data"] / "test").images[:1])[0]
    with TestClient(create_app(predictor)) as client:
        body = client.post("/predict", files=[("files", (image.name, image.read_bytes(), "image/png"))]).json()
        assert client.get("/model").json()["model"] == "ensemble"
    top = body["predictions"][0]
    assert top["name"] == predictor.classes.names[int(expected.argmax())]


def test_fitted_weights_maximise_the_held_out_likelihood() -> None:
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, 200)
    good = np.full((200, 3), 0.1)
    good[np.arange(200), targets] = 0.8
    noise = rng.dirichlet(np.ones(3), 200)
    weights = fit_weights([good, noise], targets)

    def loglik(w):
        return np.log(mix([good, noise], w)[np.arange(200), targets].astype(np.float64)).mean()

    grid = max(loglik([w, 1 - w]) for w in np.linspace(0, 1, 101))
    assert weights.sum() == pytest.approx(1.0) and weights[0] > weights[1]
    assert loglik(weights) >= grid - 1e-4


def test_fit_weights_on_images_no_member_trained_on(runs: dict, home, tmp_path) -> None:
    run = build_ensemble([runs["a"], runs["b"]], tmp_path / "ens", combine="fit", device="cpu", log=lambda _: None)
    val_ids = RunFolder(runs["a"]).read_split()["val_ids"]
    assert run["members"][0]["weight"] + run["members"][1]["weight"] == pytest.approx(1.0, abs=1e-5)
    assert RunFolder(tmp_path / "ens").read_ensemble()["held_out"]["images"] == len(val_ids)


def test_members_must_share_classes_and_layout(runs: dict, home, tmp_path) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 2))
    other = write_run_folder(tmp_path / "other", "scratch-cnn-tiny", model, ["x", "y"], in_chans=1,
                             data_channels=1, data_size=(16, 16), image_size=None, mean=[0.5], std=[0.5])
    with pytest.raises(RunFolderError, match="classes differ"):
        build_ensemble([runs["a"], other], tmp_path / "ens", device="cpu", log=lambda _: None)
    assert not (tmp_path / "ens").exists()


def test_an_ensemble_never_replaces_the_users_folder(runs: dict, home, tmp_path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(RunFolderError):
            build_ensemble([runs["a"], runs["b"]], mine, overwrite=overwrite, device="cpu", log=lambda _: None)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_zero_temperature_and_full_weight_are_the_teachers_hard_labels() -> None:
    logits = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 4, (50,), generator=torch.Generator().manual_seed(1))
    hard = F.one_hot(logits.argmax(1), 4).float()
    assert torch.equal(distillation_targets(logits, labels, 0.0, 1.0), hard)
    assert torch.equal(distillation_targets(logits, labels, 1e-4, 1.0), hard)
    assert torch.equal(distillation_targets(logits, labels, 2.0, 0.0), F.one_hot(labels, 4).float())
    mixed = distillation_targets(logits, labels, 2.0, 0.5)
    torch.testing.assert_close(mixed.sum(1), torch.ones(50))
    assert (mixed.max(1).values < 1).all()


def test_one_hot_targets_train_exactly_like_the_labels_they_encode() -> None:
    """So that the teacher's hard labels as probability targets are training on those labels."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 8, 8, 1), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 3, (32,), generator=generator)
    runtime = make_runtime("cpu", "fp32", channels_last=False)
    results = []
    for targets in (labels, F.one_hot(labels, 3).float()):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        batches = [(images[i:i + 8], targets[i:i + 8]) for i in range(0, 32, 8)]
        stats = train_one_epoch(model, batches, optimizer=optimizer, preprocess=Preprocess((0.5,), (0.5,), 1),
                                runtime=runtime, generator=torch.Generator().manual_seed(0))
        results.append((model.state_dict(), stats["acc"]))
    for key, value in results[0][0].items():
        torch.testing.assert_close(results[1][0][key], value, rtol=1e-6, atol=1e-7)
    assert results[0][1] == results[1][1]


def test_a_student_is_taught_on_training_images_only(runs: dict, home, tmp_path) -> None:
    lines: list[str] = []
    student = fit(tiny_config(runs["data"], lr=0.003, teacher=str(runs["a"])), tmp_path / "student",
                  device="cpu", log=lines.append)
    teacher = student["teacher"]
    assert f"{teacher['student_val_acc']:.2%} on the validation split" in "\n".join(lines)
    assert teacher["engine"] == "onnx"  # on a CPU (test_on_a_cpu_the_teacher_predicts_through_onnx...)
    split = RunFolder(tmp_path / "student").read_split()
    assert teacher["images"] == split["train_count"] == student["data"]["train"]
    assert teacher["student_val_images_teacher_trained_on"] == 0  # same seed: the teacher held them out too
    assert teacher["best_val_acc"] == RunFolder(runs["a"]).read_run()["best_val_acc"]
    plain = load_file(str(runs["b"] / "model.safetensors"))
    taught = load_file(str(tmp_path / "student" / "model.safetensors"))
    assert any(not torch.equal(plain[k], taught[k]) for k in plain)  # the teacher changed what it learned

    # weight 0 on the teacher: the labels alone, as in the plain run with the same settings
    fit(tiny_config(runs["data"], lr=0.003, teacher=str(runs["a"]), distill_weight=0.0), tmp_path / "labels",
        device="cpu", log=lambda _: None)
    labels_only = load_file(str(tmp_path / "labels" / "model.safetensors"))
    for key in plain:
        torch.testing.assert_close(labels_only[key], plain[key], rtol=1e-5, atol=1e-6)

    # no validation split: nothing to score the teacher on, said in words (not "None")
    lines.clear()
    fit(tiny_config(runs["data"], teacher=str(runs["a"]), val_fraction=0.0, epochs=1), tmp_path / "all",
        device="cpu", log=lines.append)
    said = next(line for line in lines if line.startswith("teacher "))
    assert "no validation split to score it" in said and "None" not in said


def test_a_teacher_of_another_labelled_subset_is_named_in_a_warning(runs: dict, home, tmp_path) -> None:
    """--per-class draws its images by --seed and --val-fraction too: a student with other values
    takes the teacher's labelled images as unlabelled ones, and is told so; with the same, nothing."""
    subset = dict(per_class=6, val_fraction=0.25, epochs=1)
    fit(tiny_config(runs["data"], **subset), tmp_path / "teacher", device="cpu", log=lambda _: None)
    said: dict[str, list[str]] = {}
    for name, changes in {"same": {}, "other": {"val_fraction": 0.4}, "seed": {"seed": 1}}.items():
        said[name] = []
        fit(tiny_config(runs["data"], **{**subset, **changes}, teacher=str(tmp_path / "teacher"),
                        distill_weight=0.0, unlabelled=str(runs["data"] / "train")),
            tmp_path / name, device="cpu", log=said[name].append)
    assert not any("another labelled subset" in line for line in said["same"])
    for name, shown in (("other", "--val-fraction 0.4"), ("seed", "--seed 1")):
        warning = [line for line in said[name] if "another labelled subset" in line]
        assert len(warning) == 1 and warning[0].startswith("warning: teacher ") and shown in warning[0]
        assert str(tmp_path / "teacher") in warning[0]


def test_on_a_cpu_the_teacher_predicts_through_onnx_with_eager_probabilities(runs: dict, home, monkeypatch) -> None:
    from types import SimpleNamespace

    import imgcls.predict
    from imgcls.errors import ImgclsError
    from imgcls.train.distill import load_teacher

    config = tiny_config(runs["data"], teacher=str(runs["a"]))
    data = SimpleNamespace(classes=RunFolder(runs["a"]).class_map())
    images = load_predictor(runs["a"], device="cpu").load(runs["data"] / "test").images
    eager = load_predictor(runs["a"], engine="torch", device="cpu").predict_proba(images)
    teacher = load_teacher(config, data, device="cpu", log=lambda _: None)
    assert teacher.engine == "onnx"
    np.testing.assert_allclose(teacher.predict_proba(images), eager, atol=1e-5)
    assert load_teacher(config, data, device="cpu", prefer_onnx=False).engine == "torch"  # torchrun's ranks

    def no_export(*args, **kwargs):
        raise ImgclsError("export refused\nsecond line")

    monkeypatch.setattr(imgcls.predict.OnnxPredictor, "from_run", no_export)
    notices: list[str] = []
    assert load_teacher(config, data, device="cpu", log=notices.append).engine == "torch"
    assert notices == [f"teacher {runs['a']}: no ONNX graph (export refused); it predicts through PyTorch"]


def test_distill_needs_a_finished_teacher(runs: dict, home, tmp_path, capsys) -> None:
    train = str(runs["data"] / "train")
    assert main(["distill", train, "--out", str(tmp_path / "s"), "--model", "scratch-cnn-tiny"]) == 2
    assert "--teacher" in capsys.readouterr().err
    code = main(["distill", train, "--out", str(tmp_path / "s"), "--teacher", str(tmp_path / "nothing")])
    assert code != 0 and "finished run" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_pseudo_labels_skip_the_runs_own_images_and_respect_the_threshold(runs: dict, home, tmp_path) -> None:
    import shutil

    from imgcls.data import load_dataset

    data = runs["data"]
    pool = tmp_path / "pool"
    make_csv_dataset(tmp_path / "more", n_per_class=6, n_test=3, seed=7)
    shutil.copytree(tmp_path / "more" / "train", pool)
    val_ids = RunFolder(runs["a"]).read_split()["val_ids"]
    with open(pool / "train.csv", "a") as csv_file:  # copies of two validation images under new names
        for k, image_id in enumerate(val_ids[:2]):
            shutil.copy(data / "train" / "images" / f"{image_id}.png", pool / "images" / f"copy{k}.png")
            csv_file.write(f"copy{k}.png,0\n")
    pool_size = 6 * 3 + 2
    teacher = load_predictor(runs["a"], engine="onnx", device="cpu")  # the student's teacher engine on a CPU
    fresh = load_dataset(pool, require_labels=False, channels=1, size=(16, 16))
    confidence = teacher.predict_proba(fresh.images).max(1)
    copies = [fresh.ids.index(f"copy{k}.png") for k in range(2)]
    confidence[copies] = 0.0  # never candidates
    threshold = float(np.median(confidence[confidence > 0]))  # about half the pool passes
    run = fit(tiny_config(data, lr=0.003, teacher=str(runs["a"]), unlabelled=str(pool), pseudo_threshold=threshold,
                          pseudo_targets="hard"), tmp_path / "student", device="cpu", log=lambda _: None)
    pseudo = run["pseudo_labels"]
    assert pseudo["images"] == pool_size and pseudo["left_out_validation_copies"] == 2
    assert pseudo["candidates"] == pool_size - 2
    confident = confidence >= threshold
    assert pseudo["kept"] == int(confident.sum()) and 0 < pseudo["kept"] < pool_size
    assert run["data"]["train"] == RunFolder(tmp_path / "student").read_split()["train_count"] + pseudo["kept"]
    assert RunFolder(tmp_path / "student").read_split()["val_ids"] == val_ids  # validation untouched


def test_a_teacher_with_flip_tta_labels_by_its_averaged_probabilities(runs: dict, home, tmp_path, capsys) -> None:
    from imgcls.data import load_dataset
    from imgcls.train.distill import teacher_logits

    pool = make_csv_dataset(tmp_path / "more", n_per_class=8, n_test=3, seed=7) / "train"  # new images
    teacher = load_predictor(runs["a"], engine="onnx", device="cpu")
    images = load_dataset(pool, require_labels=False, channels=1, size=(16, 16)).images
    plain = teacher.predict_proba(images)
    mirrored = teacher.predict_proba(torch.flip(images, dims=[2]))  # NHWC: width is dim 2
    teacher.tta = "flip"
    averaged = torch.softmax(teacher_logits(teacher, images), 1).numpy()
    np.testing.assert_allclose(averaged, (plain + mirrored) / 2, atol=1e-6)

    # a threshold that the averaged confidence and the plain one split differently
    flip_conf, plain_conf = averaged.max(1), plain.max(1)
    threshold = next(float(t) for t in np.sort(flip_conf) if (flip_conf >= t).sum() != (plain_conf >= t).sum())
    run = fit(tiny_config(runs["data"], lr=0.003, teacher=str(runs["a"]), unlabelled=str(pool),
                          pseudo_threshold=threshold, pseudo_targets="hard", teacher_tta="flip"),
              tmp_path / "student", device="cpu", log=lambda _: None)
    pseudo = run["pseudo_labels"]
    assert pseudo["teacher_tta"] == "flip" and run["teacher"]["tta"] == "flip"
    assert pseudo["candidates"] == len(images)
    assert pseudo["kept"] == int((flip_conf >= threshold).sum()) != int((plain_conf >= threshold).sum())

    assert main(["train", str(runs["data"] / "train"), "--out", str(tmp_path / "x"), "--teacher-tta", "flip"]) == 2
    assert "--teacher-tta needs --teacher" in capsys.readouterr().err


def test_the_runs_own_labelled_images_are_never_pseudo_labelled(runs: dict, home, tmp_path) -> None:
    data = runs["data"]
    run = fit(tiny_config(data, lr=0.003, teacher=str(runs["a"]), unlabelled=str(data / "train"),
                          pseudo_threshold=0.0), tmp_path / "student", device="cpu", log=lambda _: None)
    pseudo = run["pseudo_labels"]
    assert pseudo["left_out_labelled_files"] == pseudo["images"] == run["data"]["train"] + run["data"]["val"]
    assert pseudo["kept"] == 0


def test_compare_shows_the_ensemble_and_the_student_next_to_the_cells(tmp_path) -> None:
    from imgcls.compare import UNLABELLED_IS_TRAIN, Cell, Grid, Teaching, markdown_table, run_grid

    data = make_csv_dataset(tmp_path / "ds", n_per_class=10, n_test=12)
    members = (Cell("scratch-cnn-tiny", "scratch", None, 0), Cell("scratch-cnn-tiny", "scratch", None, 1))
    pseudo_step = Teaching(members[:1], Cell("scratch-cnn-tiny", "scratch", 4, 0),
                           (("unlabelled", UNLABELLED_IS_TRAIN), ("distill_weight", 0.0), ("pseudo_threshold", 0.0)))
    grid = Grid(pairs=(("scratch-cnn-tiny", "scratch"),), per_class=(None,), seeds=(0, 1), epochs=2,
                val_fraction=0.2, train_overrides={"batch_size": 16},
                teaching=(Teaching(members, Cell("scratch-cnn-tiny", "scratch", None, 0)), pseudo_step),
                ensembles=((members[0], pseudo_step.student_cell()),))  # the professor with his student
    rows = run_grid(data / "train", data / "test", tmp_path / "cmp", grid, labels=data / "test_labels.csv",
                    log=lambda _: None)
    by_model = {(r["model"], r["strategy"]): r for r in rows}
    ensemble = next(r for r in rows if r["model"] == "ensemble" and "taught-by" not in r["run"])
    student = by_model[("scratch-cnn-tiny", "scratch + distill")]
    assert len(rows) == 6 and sorted(r["rank"] for r in rows) == [1, 2, 3, 4, 5, 6]
    pseudo = RunFolder(tmp_path / "cmp" / by_model[("scratch-cnn-tiny", "scratch + pseudo-labels")]["run"]).read_run()
    assert pseudo["pseudo_labels"]["kept"] == pseudo["pseudo_labels"]["candidates"] > 0  # threshold 0: all
    assert pseudo["teacher"]["run"] == str((tmp_path / "cmp" / members[0].name).resolve())
    members_seconds = sum(RunFolder(tmp_path / "cmp" / c.name).read_run()["train_seconds"] for c in members)
    assert ensemble["train_seconds"] == pytest.approx(members_seconds, abs=0.02)
    taught = RunFolder(tmp_path / "cmp" / student["run"]).read_run()["teacher"]
    assert taught["run"] == str((tmp_path / "cmp" / ensemble["run"]).resolve())
    assert "ensemble / mean of 2" in markdown_table(rows)
    # What a student cost is its own training and its teacher's whole pipeline.
    assert student["pipeline_seconds"] == pytest.approx(student["train_seconds"] + members_seconds, abs=0.2)
    pseudo_row = by_model[("scratch-cnn-tiny", "scratch + pseudo-labels")]
    first = RunFolder(tmp_path / "cmp" / members[0].name).read_run()["train_seconds"]
    assert pseudo_row["pipeline_seconds"] == pytest.approx(pseudo_row["train_seconds"] + first, abs=0.2)
    with_student = next(r for r in rows if r["model"] == "ensemble" and "taught-by" in r["run"])
    assert with_student["pipeline_seconds"] == pytest.approx(pseudo_row["pipeline_seconds"], abs=0.2)  # teacher once
    assert all(r["predict_images_per_s"] > 0 for r in rows)
    from imgcls.evaluate.report import grid_findings, write_report

    findings = " ".join(grid_findings(rows))
    assert "best student" in findings and "best ensemble" in findings and "best transfer" not in findings

    assert "ensemble" in write_report(tmp_path / "cmp", rows).read_text()
