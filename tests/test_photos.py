"""Photos: one decode path for files and uploads, EXIF / float / 16-bit images, storage size,
the memory-mapped cache (damage, killed builds, several readers, resident memory), the source seam."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import HANG_S, make_folder_dataset
from imgcls.data import cache, load_dataset
from imgcls.data.images import RESIZE_POLICIES
from imgcls.data.source import MemmapSource, TensorSource
from imgcls.serve.uploads import UploadLimits, decode_upload

SRC = str(Path(__file__).resolve().parents[1] / "src")


def pattern(height: int, width: int, channels: int, seed: int) -> np.ndarray:
    """Smooth gradients plus blocks: every crop, squash or pad of it looks different."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    planes = [(yy * rng.uniform(1, 4) + xx * rng.uniform(1, 4) + rng.uniform(0, 255)) % 256
              for _ in range(channels)]
    image = np.stack(planes, -1)
    image[: height // 3, : width // 4] = rng.integers(0, 256, channels)
    return image.astype(np.uint8).squeeze(-1) if channels == 1 else image.astype(np.uint8)


def turned_file(displayed: np.ndarray, path: Path) -> None:
    """Store the image rotated, with EXIF orientation 6 (rotate 90 degrees clockwise to show it)."""
    stored = Image.fromarray(displayed).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif)


# name, (height, width), channels, format: portrait and landscape, JPEG and PNG, grey and RGB.
PHOTOS = [("land", (40, 60), 3, "JPEG"), ("port", (50, 30), 3, "PNG"), ("grey", (48, 48), 1, "PNG"),
          ("big", (150, 200), 3, "JPEG"), ("greyjpg", (36, 52), 1, "JPEG")]


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    return make_photo_dir(tmp_path / "photos")


def make_photo_dir(root: Path) -> Path:
    """Mixed sizes, portrait and landscape, JPEG and PNG, grey and RGB, one EXIF-rotated JPEG."""
    (root / "images").mkdir(parents=True)
    rows = ["id,label"]
    for k, (name, (h, w), c, fmt) in enumerate(PHOTOS):
        ext = "jpg" if fmt == "JPEG" else "png"
        Image.fromarray(pattern(h, w, c, k)).save(root / "images" / f"{name}.{ext}", quality=88)
        rows.append(f"{name},{'ab'[k % 2]}")
    turned_file(pattern(64, 40, 3, 9), root / "images" / "turned.jpg")
    rows.append("turned,a")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize("policy", RESIZE_POLICIES)
def test_dataset_and_upload_paths_give_the_same_pixels(photo_dir: Path, policy: str) -> None:
    data = load_dataset(photo_dir, size=(24, 24), channels=3, resize=policy)
    assert data.images.shape == (6, 24, 24, 3)
    for i, path in enumerate(data.table.paths):
        upload = decode_upload(path.read_bytes(), path.name, 3, (24, 24), UploadLimits(), policy)
        assert np.array_equal(upload, data.images[i].numpy()), (policy, path.name)


def test_policies_differ_as_named(photo_dir: Path) -> None:
    """A portrait photo: crop keeps the middle, pad leaves black bars left and right, squash neither."""
    port = [p.stem for p in read_paths(photo_dir)].index("port")
    crop, squash, pad = (load_dataset(photo_dir, size=(30, 30), channels=3, resize=p).images[port].numpy()
                         .astype(int) for p in ("crop", "squash", "pad"))
    assert pad[:, :5].max() == 0 and pad[:, -5:].max() == 0 and pad[:, 12:18].max() > 0
    assert crop[:, :5].max() > 0 and not np.array_equal(crop, squash)


def read_paths(root: Path) -> list[Path]:
    from imgcls.data.table import read_dataset
    return read_dataset(root).paths


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    displayed = pattern(64, 40, 3, 3)
    (tmp_path / "images").mkdir()
    turned_file(displayed, tmp_path / "images" / "a.png")
    Image.fromarray(displayed).save(tmp_path / "images" / "b.png")
    (tmp_path / "t.csv").write_text("id,label\na,x\nb,y\n")
    data = load_dataset(tmp_path)
    assert data.image_size == (64, 40)  # the header probe reads the orientation too: one size, native
    assert np.array_equal(data.images[0].numpy(), displayed)
    assert np.array_equal(data.images[1].numpy(), displayed)


def test_float_and_16_bit_images_are_scaled_to_the_displayed_range(tmp_path: Path) -> None:
    ramp = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    (tmp_path / "images").mkdir()
    Image.fromarray(ramp, mode="F").save(tmp_path / "images" / "f.tif")
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "images" / "s.png")
    (tmp_path / "t.csv").write_text("id,label\nf,x\ns,y\n")
    data = load_dataset(tmp_path)
    expected = np.rint(ramp * 255)
    for i in range(2):
        assert np.abs(data.images[i, :, :, 0].numpy().astype(int) - expected).max() <= 1


def test_photos_are_stored_at_a_size_that_serves_the_model(photo_dir: Path) -> None:
    data = load_dataset(photo_dir, input_side=32)
    assert data.image_size == (cache.storage_side(32), cache.storage_side(32)) == (37, 37)
    assert isinstance(data.source, MemmapSource) and isinstance(data.source.array, np.memmap)


def test_small_images_of_one_size_stay_native_and_bit_identical(csv_dataset: Path) -> None:
    data = load_dataset(csv_dataset / "train", input_side=96)
    assert data.image_size == (16, 16) and data.channels == 1
    for i in (0, 7):
        assert np.array_equal(data.images[i, :, :, 0].numpy(), np.asarray(Image.open(data.table.paths[i])))


def test_channel_stats_match_the_full_float_computation(photo_dir: Path, monkeypatch) -> None:
    data = load_dataset(photo_dir, input_side=32)
    idx = torch.tensor([0, 2, 3, 5])
    pixels = data.images[idx].float().div(255)
    assert data.source.channel_stats(idx) == (tuple(pixels.mean(dim=(0, 1, 2)).tolist()),
                                               tuple(pixels.std(dim=(0, 1, 2)).tolist()))
    monkeypatch.setattr("imgcls.data.source.STATS_FLOAT_BYTES", 0)  # the bounded-memory way,
    monkeypatch.setattr("imgcls.data.source.STATS_CHUNK_BYTES", 2000)  # in several chunks
    mean, std = data.source.channel_stats(idx)
    exact = data.images[idx].double().div(255)
    assert np.allclose(mean, exact.mean(dim=(0, 1, 2)).tolist(), atol=1e-12)
    assert np.allclose(std, exact.std(dim=(0, 1, 2)).tolist(), atol=1e-12)
    assert TensorSource(data.images.clone()).channel_stats(idx) == (mean, std)


def test_pool_decode_equals_one_process(photo_dir: Path, monkeypatch) -> None:
    one = load_dataset(photo_dir, input_side=32, use_cache=False).images.clone()
    assert cache.decode_workers(70_000, (28, 28)) == 1  # Fashion-MNIST: one process, no pool to start
    monkeypatch.setattr(cache, "POOL_MIN_IMAGE_PIXELS", 0)
    monkeypatch.setattr(cache, "CHUNK", 2)
    assert cache.decode_workers(6, (40, 60)) == min(len(os.sched_getaffinity(0)), 3)
    assert torch.equal(load_dataset(photo_dir, input_side=32).images, one)


def _worker_signals(filename: str, answers) -> None:
    import signal

    cache._init_worker(filename, (1, 2, 2, 1), "crop")
    answers.put((signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, signal.getsignal(signal.SIGINT) == signal.SIG_IGN))


def test_decode_workers_do_not_inherit_the_command_lines_sigterm_handler(tmp_path: Path) -> None:
    """The CLI turns SIGTERM into an interrupt; a forked decode worker inheriting that raised on the
    SIGTERM with which the pool ends its workers, and each printed a traceback. Ctrl-C goes to the
    whole process group: the parent alone handles it."""
    import multiprocessing

    from imgcls.errors import sigterm_as_interrupt

    filename = tmp_path / "pixels.u8"
    np.memmap(filename, dtype=np.uint8, mode="w+", shape=(1, 2, 2, 1)).flush()
    context = multiprocessing.get_context("fork")
    answers = context.Queue()
    with sigterm_as_interrupt():
        child = context.Process(target=_worker_signals, args=(str(filename), answers))
        child.start()
        child.join(HANG_S)
    assert answers.get(timeout=HANG_S) == (True, True)


def cache_files(root: Path, suffix: str) -> list[Path]:
    return sorted((root / ".imgcls_cache").glob(f"*{suffix}"))


def damage_truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


def damage_garbage(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "marker", "marker-json"])
def test_a_damaged_cache_is_rebuilt_with_a_notice(photo_dir: Path, damage: str, capsys) -> None:
    first = load_dataset(photo_dir, input_side=32).images.clone()
    data_file, marker = cache_files(photo_dir, ".u8")[0], cache_files(photo_dir, "-crop.json")[0]
    if damage == "truncate":
        damage_truncate(data_file)
    elif damage == "garbage":
        damage_garbage(data_file)
    elif damage == "marker":
        marker.write_text("{not json")
    else:
        meta = json.loads(marker.read_text())
        marker.write_text(json.dumps({**meta, "rows": meta["rows"] + 1}))
    capsys.readouterr()
    again = load_dataset(photo_dir, input_side=32)
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 1 and "rebuilding the cache" in notes[0] and str(data_file) in notes[0]
    assert not again.from_cache and torch.equal(again.images, first)
    assert load_dataset(photo_dir, input_side=32).from_cache


def test_the_old_npz_cache_is_replaced_not_read(photo_dir: Path) -> None:
    old = photo_dir / ".imgcls_cache" / "train-0123456789abcdef01234567.npz"
    old.parent.mkdir()
    old.write_bytes(b"PK\x03\x04 truncated zip")
    data = load_dataset(photo_dir, input_side=32)
    assert not data.from_cache and not old.exists()


KILLED_BUILD = textwrap.dedent("""
    import os, signal, sys
    import imgcls.data.cache as cache
    from imgcls.data import load_dataset
    cache.PROGRESS_EVERY_S, cache.CHUNK = 0.0, 4
    real, calls = cache.load_image, [0]
    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] > int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    cache.load_image = dying
    load_dataset(sys.argv[1], input_side=32)
""")


def test_a_build_killed_mid_way_is_resumed_never_read_as_complete(tmp_path: Path, monkeypatch) -> None:
    root = make_folder_dataset(tmp_path / "f", n_per_class=8, rgb=True)  # 24 images
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(root), "13"], env=env)
    assert run.returncode == -9
    assert not list((root / ".imgcls_cache").glob("*.u8")) and list((root / ".imgcls_cache").glob("*.partial"))
    decoded = []
    real = cache.load_image
    monkeypatch.setattr(cache, "load_image", lambda *a, **k: decoded.append(1) or real(*a, **k))
    data = load_dataset(root, input_side=32)
    assert not data.from_cache and len(decoded) == 24 - 12  # three chunks of 4 were recorded done
    assert torch.equal(data.images, load_dataset(root, input_side=32, use_cache=False).images)
    assert not list((root / ".imgcls_cache").glob("*.partial"))


READER = textwrap.dedent("""
    import sys
    from imgcls.data import load_dataset
    data = load_dataset(sys.argv[1], input_side=32)
    print(int(data.from_cache), int(data.images.sum()))
""")


def test_several_processes_build_and_read_one_cache(photo_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    expected = int(load_dataset(photo_dir, input_side=32, use_cache=False).images.sum())

    def together() -> list[list[int]]:
        procs = [subprocess.Popen([sys.executable, "-c", READER, str(photo_dir)], env=env,
                                  stdout=subprocess.PIPE, text=True) for _ in range(2)]
        return [list(map(int, p.communicate()[0].split())) for p in procs]

    built = together()  # both start on an empty cache: one builds, the other waits and reads
    assert sorted(b[0] for b in built) == [0, 1] and {b[1] for b in built} == {expected}
    assert together() == [[1, expected], [1, expected]]
    assert len(cache_files(photo_dir, ".u8")) == 1


RSS_PROBE = textwrap.dedent("""
    import sys
    from imgcls.data import load_dataset
    def anon_kb():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    before = anon_kb()
    data = load_dataset(sys.argv[1])
    # numpy's sum: torch's would upcast each batch to int64, and the allocator keeps such temporaries
    total = sum(int(data.source.gather(range(i, min(i + 50, len(data.source)))).numpy().sum())
                for i in range(0, len(data.source), 50))
    print(anon_kb() - before, data.images.numel() // 1024, int(data.from_cache))
""")


def test_resident_memory_does_not_grow_with_the_number_of_images(tmp_path: Path) -> None:
    root = tmp_path / "many"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    tile = Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    for i in range(2000):
        tile.save(root / "images" / f"{i}.png", compress_level=0)
    (root / "train.csv").write_text("id,label\n" + "".join(f"{i},{i % 2}\n" for i in range(2000)))
    load_dataset(root)  # build the cache
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(root)], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    grown_kb, pixels_kb, from_cache = map(int, out)
    assert from_cache == 1 and pixels_kb == 2000 * 96 * 96 * 3 // 1024  # 54 MB of pixels, all read
    assert grown_kb < pixels_kb // 3, out  # an in-memory copy would grow by at least pixels_kb


def test_photo_augment_crops_at_the_model_size_and_auto_picks_it_for_photos() -> None:
    from imgcls.data.transforms import Augment, PhotoAugment, Preprocess, parse_augment
    assert parse_augment("auto", 500, stored_side=110) == PhotoAugment()
    assert parse_augment("auto", 500, stored_side=28) == Augment(True, 2)  # Fashion-MNIST's recipe
    assert parse_augment("rrc-flip-erase") == PhotoAugment(flip=True, erase=0.5)
    with pytest.raises(ValueError):
        parse_augment("rrc-shift")
    x = torch.rand(8, 3, 40, 40)
    gen = torch.Generator().manual_seed(0)
    whole = PhotoAugment(flip=False, scale=(1.0, 1.0), ratio=(1.0, 1.0))(x, gen, (24, 24))
    resized = torch.nn.functional.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False)
    assert torch.allclose(whole, resized, atol=1e-5)
    mirrored = PhotoAugment(flip=True, scale=(1.0, 1.0), ratio=(1.0, 1.0))(x, gen, (24, 24))
    assert all(torch.allclose(m, r, atol=1e-5) or torch.allclose(m, r.flip(-1), atol=1e-5)
               for m, r in zip(mirrored, resized))
    crops = PhotoAugment()(x[:1].expand(8, -1, -1, -1), torch.Generator().manual_seed(1), (24, 24))
    assert crops.shape == (8, 3, 24, 24) and len({round(float(c.sum()), 3) for c in crops}) == 8
    pre = Preprocess((0.5,) * 3, (0.25,) * 3, 3, (24, 24))
    batch = (x * 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert pre(batch, augment=PhotoAugment(), generator=gen).shape == (8, 3, 24, 24)


def photo_run(photo_dir: Path, out: Path, policy: str = "pad") -> Path:
    from imgcls.config import TrainConfig
    from imgcls.train.runner import fit
    config = TrainConfig(data_dir=str(photo_dir), model="scratch-cnn-tiny", epochs=2, batch_size=2, lr=0.01,
                         precision="fp32", channels_last=False, image_size=32, resize=policy, val_fraction=0.34)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMGCLS_HOME", str(out.parent / "imgcls_home"))
        fit(config, out, device="cpu", log=lambda _: None)
    return out


def test_predict_decodes_with_the_runs_storage_shape_and_policy(photo_dir: Path, tmp_path: Path) -> None:
    from imgcls.predict import load_predictor
    run = photo_run(photo_dir, tmp_path / "run", "pad")
    predictor = load_predictor(run, device="cpu")
    assert predictor.resize_policy == "pad" and predictor.data_layout == (3, (37, 37))
    assert torch.equal(predictor.load(photo_dir).images, load_dataset(photo_dir, input_side=32, resize="pad").images)


def test_a_memory_mapped_run_equals_an_in_memory_run_bit_for_bit(photo_dir: Path, tmp_path: Path,
                                                                 monkeypatch) -> None:
    mapped = (photo_run(photo_dir, tmp_path / "mapped") / "model.safetensors").read_bytes()
    import imgcls.train.runner as runner
    real = runner.load_dataset

    def in_memory(*args, **kwargs):
        data = real(*args, **kwargs)
        assert isinstance(data.source, MemmapSource)
        data.source = TensorSource(data.images.clone())
        return data
    monkeypatch.setattr(runner, "load_dataset", in_memory)
    assert (photo_run(photo_dir, tmp_path / "memory") / "model.safetensors").read_bytes() == mapped


def mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


def test_large_feature_sets_are_file_backed_and_equal_the_in_memory_ones(monkeypatch) -> None:
    from imgcls.data.transforms import Preprocess
    from imgcls.models import create_model
    from imgcls.runtime import Runtime
    from imgcls.train import features
    torch.manual_seed(0)
    model = create_model("test_efficientnet", 3)
    images = torch.randint(0, 256, (10, 24, 24, 3), dtype=torch.uint8)
    kw = dict(preprocess=Preprocess((0.5,) * 3, (0.25,) * 3, 3, (24, 24)), runtime=Runtime(torch.device("cpu")),
              batch_size=4)
    in_memory = features.pooled_features(model, images, torch.arange(10), **kw)
    assert "imgcls-features-" not in mapped_files()
    monkeypatch.setattr(features, "FEATURES_IN_MEMORY_BYTES", 0)
    spilled = features.pooled_features(model, images, torch.arange(10), **kw)
    assert "imgcls-features-" in mapped_files()  # an unlinked temporary file, mapped
    assert torch.equal(spilled, in_memory) and spilled.shape == (10, model.num_features)
    del spilled


def test_a_dataset_is_predicted_from_its_source_a_chunk_at_a_time(photo_dir: Path, tmp_path: Path,
                                                                 monkeypatch) -> None:
    import imgcls.predict as predict
    predictor = predict.load_predictor(photo_run(photo_dir, tmp_path / "run"), device="cpu")
    data = predictor.load(photo_dir)
    whole = predictor.predict_proba(data.images, batch_size=2)
    monkeypatch.setattr(predict, "PREDICT_CHUNK_IMAGES", 4)  # chunks of 4 images, the last one short
    assert len(data.source) % 4 != 0
    np.testing.assert_array_equal(predictor.predict_proba(data.source, batch_size=2), whole)
    picked = torch.tensor([4, 0, 2])
    assert torch.equal(data.source.subset(picked).gather(torch.tensor([2, 0])), data.images[[2, 4]])
    np.testing.assert_array_equal(predictor.predict_proba(data.source.subset(picked), batch_size=2), whole[picked])


def test_a_stale_cache_another_process_is_building_is_left_alone(tmp_path: Path) -> None:
    """The data changed while another run decodes it: that run's half-written cache is not deleted
    under it (it would crash); once nobody builds it, the next build removes it."""
    import fcntl

    from conftest import make_csv_dataset
    from imgcls.data import load_dataset

    data = make_csv_dataset(tmp_path / "ds", n_per_class=4, n_test=3)
    root = data / "train" / ".imgcls_cache"
    root.mkdir(parents=True)
    busy = root / "train-0123456789abcdef-16x16x1-native"
    busy.with_suffix(".partial").write_bytes(b"half")
    with open(busy.with_suffix(".lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as _locked holds it during a build
        load_dataset(data / "train")
        assert busy.with_suffix(".partial").exists()
        fcntl.flock(lock, fcntl.LOCK_UN)
    (data / "train" / "train.csv").write_text((data / "train" / "train.csv").read_text() + "\n")
    load_dataset(data / "train")  # the CSV changed: a new build, which now removes the idle stale file
    assert not busy.with_suffix(".partial").exists()
