"""Label-noise injection: noise plans, per-batch noise, subset writing and the ``noise`` command."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from robustface.cli import main
from robustface.data.image import encode_image
from robustface.data.noise import (
    CLEAN,
    CLOSED,
    NOISE_SETTINGS,
    OPEN,
    NoisePlan,
    batch_noise,
    inject_noise,
    load_noise_list,
    noise_list_for,
    noise_summary_table,
    parse_noise_setting,
    plan_label_noise,
)
from robustface.data.recordio import RecordIODataset, unpack_record, write_insightface_rec
from robustface.data.subset import write_rec_subset
from robustface.errors import DataFormatError


def record_payloads(path: Path) -> list[bytes]:
    """Encoded image of every dataset index, read straight from the records."""
    ds = RecordIODataset(path)
    keys = range(1, len(ds) + 1) if ds.layout == "insightface" else ds.reader.keys
    return [unpack_record(ds.reader.read(int(k)))[1] for k in keys]


def make_rec(directory: Path, labels: list[int], size: int, seed: int) -> list[bytes]:
    """A small insightface .rec of random JPEGs; returns the image bytes in dataset order."""
    rng = np.random.default_rng(seed)
    images = [encode_image(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in labels]
    directory.mkdir(parents=True, exist_ok=True)
    write_insightface_rec(directory, zip(images, labels, strict=True), image_size=(size, size))
    return images


@pytest.fixture(scope="module")
def open_source(tmp_path_factory: pytest.TempPathFactory, synth_train_dir: Path) -> Path:
    """An outside-identity source of 20 images (5 classes) with a SynthFace-style manifest."""
    size = RecordIODataset(synth_train_dir).image_size[0]
    out = tmp_path_factory.mktemp("open") / "open_set"
    make_rec(out, [i // 4 for i in range(20)], size, seed=7)
    quality = np.round(np.linspace(0.05, 0.95, 20), 4).tolist()
    (out / "manifest.json").write_text(json.dumps({"samples": {"quality": quality}}))
    return out


# ---------------------------------------------------------------- settings


def test_named_settings() -> None:
    expected = {
        "clean": (0.0, 0.0),
        "C20": (0.2, 0.0),
        "C20O20": (0.2, 0.2),
        "C10O30": (0.1, 0.3),
        "C30O10": (0.3, 0.1),
        "MS1MCON-0.20": (0.15, 0.05),
    }
    assert expected == NOISE_SETTINGS
    for name, rates in expected.items():
        assert parse_noise_setting(name) == rates
        assert parse_noise_setting(name.lower()) == rates
        assert parse_noise_setting(name.upper()) == rates


@pytest.mark.parametrize(
    ("name", "rates"),
    [("C25", (0.25, 0.0)), ("o5", (0.0, 0.05)), ("c40O10", (0.4, 0.1)), ("C0O100", (0.0, 1.0))],
)
def test_custom_settings(name: str, rates: tuple[float, float]) -> None:
    assert parse_noise_setting(name) == pytest.approx(rates)


@pytest.mark.parametrize("name", ["", "C", "X20", "C20O", "O20C20", "C-5", "C60O50", "C101"])
def test_bad_settings(name: str) -> None:
    with pytest.raises(ValueError, match=r"noise setting"):
        parse_noise_setting(name)


def test_unknown_setting_lists_the_named_ones() -> None:
    with pytest.raises(ValueError, match=r"MS1MCON-0\.20"):
        parse_noise_setting("BoundaryFace")


# ---------------------------------------------------------------- the BoundaryFace plan


def class_sizes_labels(seed: int = 0) -> np.ndarray:
    """Classes of sizes 1..30 in a shuffled sample order."""
    labels = np.repeat(np.arange(30), np.arange(1, 31))
    return np.random.default_rng(seed).permutation(labels)


@pytest.mark.parametrize(("closed_pct", "open_pct"), [(20, 0), (20, 20), (10, 30), (30, 10)])
def test_plan_counts_per_class(closed_pct: int, open_pct: int) -> None:
    labels = class_sizes_labels()
    plan = plan_label_noise(labels, closed_pct / 100, open_pct / 100, open_pool=10_000, seed=3)
    plan.validate()
    assert len(plan) == len(labels)
    for c in range(30):
        rows = labels == c
        n_c = int(rows.sum())
        kinds = plan.kind[rows]
        assert (kinds == OPEN).sum() == n_c * open_pct // 100, c
        assert (kinds == CLOSED).sum() == n_c * closed_pct // 100, c
        assert (kinds == CLEAN).sum() == n_c - n_c * open_pct // 100 - n_c * closed_pct // 100


def test_plan_rows_follow_the_input_samples() -> None:
    labels = class_sizes_labels()
    plan = plan_label_noise(labels, 0.3, 0.1, open_pool=10_000, seed=1)
    train = plan.kind != OPEN
    np.testing.assert_array_equal(plan.source_index[train], np.flatnonzero(train))
    np.testing.assert_array_equal(plan.original_label[train], labels[train])
    assert (plan.source[train] == 0).all()
    clean = plan.kind == CLEAN
    np.testing.assert_array_equal(plan.label[clean], labels[clean])
    closed = plan.kind == CLOSED
    assert (plan.label[closed] != labels[closed]).all()
    assert ((plan.label >= 0) & (plan.label < 30)).all()
    assert len(np.unique(plan.label[closed])) > 10  # spread over the other classes
    is_open = plan.kind == OPEN
    np.testing.assert_array_equal(plan.label[is_open], labels[is_open])
    assert (plan.original_label[is_open] == -1).all()
    assert (plan.source[is_open] == 1).all()
    pool = plan.source_index[is_open]
    assert ((pool >= 0) & (pool < 10_000)).all()
    assert len(np.unique(pool)) == pool.size  # no repeats while the pool is large enough


def test_closed_label_with_two_classes_is_the_other_class() -> None:
    labels = np.repeat([0, 1], 50)
    plan = plan_label_noise(labels, 0.4, 0.0, open_pool=0, seed=0)
    closed = plan.kind == CLOSED
    assert closed.sum() == 40
    np.testing.assert_array_equal(plan.label[closed], 1 - labels[closed])


def test_small_open_pool_draws_with_replacement() -> None:
    labels = np.repeat(np.arange(10), 10)
    plan = plan_label_noise(labels, 0.0, 0.5, open_pool=3, seed=0)
    pool = plan.source_index[plan.kind == OPEN]
    assert pool.size == 50
    assert set(pool.tolist()) == {0, 1, 2}


def test_plan_is_deterministic_by_seed() -> None:
    labels = class_sizes_labels()
    a = plan_label_noise(labels, 0.2, 0.2, open_pool=500, seed=5)
    b = plan_label_noise(labels, 0.2, 0.2, open_pool=500, seed=5)
    c = plan_label_noise(labels, 0.2, 0.2, open_pool=500, seed=6)
    for name, value in a.arrays().items():
        np.testing.assert_array_equal(value, b.arrays()[name])
    assert not np.array_equal(a.kind, c.kind)
    assert not np.array_equal(a.label, c.label)


def test_plan_errors() -> None:
    with pytest.raises(ValueError, match="2 classes"):
        plan_label_noise(np.zeros(10, np.int64), 0.2, 0.0, open_pool=0, seed=0)
    with pytest.raises(ValueError, match="open_pool"):
        plan_label_noise(np.arange(10), 0.0, 0.2, open_pool=0, seed=0)
    with pytest.raises(ValueError, match="sum to at most 1"):
        plan_label_noise(np.arange(10), 0.6, 0.5, open_pool=5, seed=0)
    with pytest.raises(ValueError, match="integer"):
        plan_label_noise(np.zeros(10), 0.2, 0.0, open_pool=0, seed=0)


def test_validate_names_the_broken_rule() -> None:
    plan = plan_label_noise(np.repeat(np.arange(4), 5), 0.2, 0.2, open_pool=10, seed=0)
    broken = plan.take(np.arange(len(plan)))
    row = int(np.flatnonzero(broken.kind == CLEAN)[0])
    broken.label[row] = (broken.label[row] + 1) % 4
    with pytest.raises(ValueError, match=f"row {row} .*iff kind is clean"):
        broken.validate()


# ---------------------------------------------------------------- RobustFace per batch


def test_batch_noise_counts_and_positions() -> None:
    labels = np.random.default_rng(0).integers(0, 50, size=64)
    kind, new, open_index = batch_noise(
        labels, 0.2, 0.1, num_classes=50, open_pool=30, rng=np.random.default_rng(1)
    )
    n_open, n_closed = 6, 12  # floor(64 * 0.1), floor(64 * 0.2)
    np.testing.assert_array_equal(kind[:n_open], OPEN)
    np.testing.assert_array_equal(kind[n_open : n_open + n_closed], CLOSED)
    np.testing.assert_array_equal(kind[n_open + n_closed :], CLEAN)
    np.testing.assert_array_equal(new[:n_open], labels[:n_open])
    assert (new[n_open : n_open + n_closed] != labels[n_open : n_open + n_closed]).all()
    assert ((new >= 0) & (new < 50)).all()
    np.testing.assert_array_equal(new[n_open + n_closed :], labels[n_open + n_closed :])
    assert ((open_index[:n_open] >= 0) & (open_index[:n_open] < 30)).all()
    np.testing.assert_array_equal(open_index[n_open:], -1)
    assert labels.dtype == np.int64 and not np.shares_memory(new, labels)


def test_batch_noise_errors() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="num_classes"):
        batch_noise(np.zeros(10, np.int64), 0.2, 0.0, num_classes=1, open_pool=0, rng=rng)
    with pytest.raises(ValueError, match="num_classes=5"):
        batch_noise(np.full(10, 5), 0.2, 0.0, num_classes=5, open_pool=0, rng=rng)
    with pytest.raises(ValueError, match="open_pool"):
        batch_noise(np.zeros(10, np.int64), 0.0, 0.2, num_classes=5, open_pool=0, rng=rng)


# ---------------------------------------------------------------- write_rec_subset


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list, list]:
    root = tmp_path_factory.mktemp("sources")
    a = make_rec(root / "a", [0, 0, 1, 1, 2, 2], 16, seed=1)
    b = make_rec(root / "b", [0, 1, 1, 2], 16, seed=2)
    return root / "a", root / "b" / "train.rec", a, b


def test_write_rec_subset_two_sources(tmp_path: Path, two_sources) -> None:
    dir_a, rec_b, images_a, images_b = two_sources
    picks = np.array([[0, 5], [1, 0], [0, 1], [1, 3], [0, 0], [1, 1]])
    labels = np.array([2, 0, 1, 0, 1, 2])
    order = write_rec_subset(tmp_path, [dir_a, rec_b], picks, labels, num_classes=3)
    np.testing.assert_array_equal(order, [1, 3, 2, 4, 0, 5])
    ds = RecordIODataset(tmp_path)
    assert ds.num_classes == 3 and ds.image_size == (16, 16)
    np.testing.assert_array_equal(ds.labels, labels[order])
    sources = (images_a, images_b)
    expected = [sources[picks[r, 0]][picks[r, 1]] for r in order]
    assert record_payloads(tmp_path) == expected
    assert ds[0][0].shape == (16, 16, 3)


def test_write_rec_subset_errors(tmp_path: Path, two_sources) -> None:
    dir_a, rec_b, _, _ = two_sources
    ok = np.array([[0, 0], [1, 1]])
    with pytest.raises(ValueError, match=r"no samples, first \[1, 2\]"):
        write_rec_subset(tmp_path, [dir_a], ok, np.array([0, 0]), num_classes=3)
    with pytest.raises(ValueError, match="names source 2"):
        write_rec_subset(tmp_path, [dir_a, rec_b], [[0, 0], [2, 0]], [0, 1], num_classes=2)
    with pytest.raises(ValueError, match=r"picks\[1\].*4 images"):
        write_rec_subset(tmp_path, [dir_a, rec_b], [[0, 0], [1, 4]], [0, 1], num_classes=2)
    with pytest.raises(ValueError, match=r"picks must have shape \(N, 2\)"):
        write_rec_subset(tmp_path, [dir_a], np.zeros((2, 3), np.int64), [0, 1], num_classes=2)
    with pytest.raises(ValueError, match="picks has 2 rows but labels has 3"):
        write_rec_subset(tmp_path, [dir_a], ok, [0, 1, 1], num_classes=2)
    with pytest.raises(ValueError, match=r"labels\[1\] = 2"):
        write_rec_subset(tmp_path, [dir_a], ok, [0, 2], num_classes=2)
    assert not any(tmp_path.iterdir())  # nothing written on any of these


def test_write_rec_subset_rejects_mixed_sizes(tmp_path: Path, two_sources) -> None:
    dir_a = two_sources[0]
    make_rec(tmp_path / "big", [0, 1], 24, seed=3)
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="differ in image size"):
        write_rec_subset(
            tmp_path / "out", [dir_a, tmp_path / "big"], [[0, 0], [1, 0]], [0, 1], num_classes=2
        )


# ---------------------------------------------------------------- inject_noise


def test_inject_noise_end_to_end(tmp_path: Path, synth_train_dir: Path, open_source: Path) -> None:
    out = tmp_path / "noisy"
    info = inject_noise(
        synth_train_dir, out, "C20O20", open_source=open_source, seed=4, progress=False
    )
    assert info.path == out and info.counts == {"clean": 48, "closed": 8, "open": 8}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "train.rec", "train.idx", "property", "noise.npz", "noise.json",
            "lfw.bin", "cfp_fp.bin", "verification.json",
        ]
    )  # fmt: skip
    for name in ("lfw.bin", "verification.json"):
        assert (out / name).read_bytes() == (synth_train_dir / name).read_bytes()
    assert not out.with_name("noisy.partial").exists()

    plan = load_noise_list(out)
    ds = RecordIODataset(out)
    assert len(ds) == len(plan) == 64 and ds.num_classes == 8
    np.testing.assert_array_equal(ds.labels, plan.label)
    assert (np.diff(ds.labels) >= 0).all()
    sources = (record_payloads(synth_train_dir), record_payloads(open_source))
    payloads = record_payloads(out)
    for i in range(len(ds)):
        assert payloads[i] == sources[plan.source[i]][plan.source_index[i]], i
    assert ds[len(ds) - 1][0].shape == (112, 112, 3)  # decodes

    train_labels = RecordIODataset(synth_train_dir).labels
    is_open = plan.kind == OPEN
    np.testing.assert_array_equal(
        plan.original_label[~is_open], train_labels[plan.source_index[~is_open]]
    )
    assert len(np.unique(plan.source_index[~is_open])) == 56  # each kept training image once
    for c in range(8):  # one open and one closed sample taken from each class of 8
        assert ((plan.kind == OPEN) & (plan.label == c)).sum() == 1
        assert ((plan.kind == CLOSED) & (plan.original_label == c)).sum() == 1

    manifest = json.loads((synth_train_dir / "manifest.json").read_text())
    train_q = np.asarray(manifest["samples"]["quality"], np.float32)
    open_q = np.asarray(
        json.loads((open_source / "manifest.json").read_text())["samples"]["quality"]
    )
    np.testing.assert_array_equal(plan.quality[~is_open], train_q[plan.source_index[~is_open]])
    np.testing.assert_allclose(plan.quality[is_open], open_q[plan.source_index[is_open]], rtol=1e-6)

    meta = json.loads((out / "noise.json").read_text())
    assert meta["setting"] == "C20O20" and meta["seed"] == 4
    assert (meta["closed_rate"], meta["open_rate"]) == (0.2, 0.2)
    assert meta["counts"] == info.counts and meta["num_classes"] == 8
    assert meta["open_source"].endswith("train.rec") and "robustface" in meta

    listed = noise_list_for(out / "train.rec")
    assert listed is not None
    np.testing.assert_array_equal(listed.kind, plan.kind)
    assert noise_list_for(synth_train_dir) is None


def test_inject_noise_deterministic(tmp_path: Path, synth_train_dir: Path) -> None:
    a = inject_noise(synth_train_dir, tmp_path / "a", "C30", seed=1, progress=False)
    inject_noise(synth_train_dir, tmp_path / "b", "c30", seed=1, progress=False)
    assert (tmp_path / "a/train.rec").read_bytes() == (tmp_path / "b/train.rec").read_bytes()
    assert a.counts == {"clean": 48, "closed": 16, "open": 0}  # floor(8 * 0.3) = 2 per class
    meta = json.loads((tmp_path / "a/noise.json").read_text())
    assert meta["open_source"] is None
    if os.name == "posix":  # verification sets are hard links, not copies
        assert (tmp_path / "a/lfw.bin").stat().st_ino == (synth_train_dir / "lfw.bin").stat().st_ino


def test_inject_noise_overwrite_rules(tmp_path: Path, synth_train_dir: Path) -> None:
    user = tmp_path / "user"
    user.mkdir()
    (user / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="exists"):
        inject_noise(synth_train_dir, user, "C20", progress=False)
    with pytest.raises(FileExistsError, match=r"holds no noise\.json"):
        inject_noise(synth_train_dir, user, "C20", overwrite=True, progress=False)
    assert (user / "precious.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="input directory"):
        inject_noise(synth_train_dir, synth_train_dir, "C20", overwrite=True, progress=False)

    out = tmp_path / "noisy"
    inject_noise(synth_train_dir, out, "C20", seed=0, progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        inject_noise(synth_train_dir, out, "C20", seed=1, progress=False)
    inject_noise(synth_train_dir, out, "C20", seed=1, overwrite=True, progress=False)
    assert json.loads((out / "noise.json").read_text())["seed"] == 1


def test_inject_noise_leaves_nothing_on_failure(tmp_path: Path, synth_train_dir: Path) -> None:
    out = tmp_path / "noisy"
    with pytest.raises(FileNotFoundError, match="open-set source"):
        inject_noise(synth_train_dir, out, "C20O20", progress=False)  # no open_set/ there
    small = tmp_path / "small_open"
    make_rec(small, [0, 1], 16, seed=0)  # 16x16 images do not fit a 112x112 training set
    with pytest.raises(ValueError, match="differ in image size"):
        inject_noise(synth_train_dir, out, "O20", open_source=small, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small_open"]


# ---------------------------------------------------------------- noise lists on disk


def test_load_noise_list_errors(tmp_path: Path) -> None:
    plan = plan_label_noise(np.repeat(np.arange(4), 5), 0.2, 0.2, open_pool=10, seed=0)
    arrays = plan.arrays()
    np.savez(tmp_path / "missing.npz", **{k: v for k, v in arrays.items() if k != "source"})
    with pytest.raises(DataFormatError, match=r"missing.npz: missing arrays \['source'\]"):
        load_noise_list(tmp_path / "missing.npz")
    bad = dict(arrays, original_label=np.where(plan.kind == OPEN, 0, plan.original_label))
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(DataFormatError, match=r"bad\.npz: inconsistent noise list"):
        load_noise_list(tmp_path / "bad.npz")
    np.savez(tmp_path / "float.npz", **dict(arrays, label=plan.label.astype(np.float32)))
    with pytest.raises(DataFormatError, match="array label has dtype float32"):
        load_noise_list(tmp_path / "float.npz")
    with pytest.raises(FileNotFoundError, match="noise list not found"):
        load_noise_list(tmp_path)
    np.save(tmp_path / "array.npy", plan.label)  # a plain array, and a CSV given by mistake
    (tmp_path / "flags.csv").write_text("index,label\n0,1\n")
    for name in ("array.npy", "flags.csv"):
        with pytest.raises(DataFormatError, match=rf"{name}: not a noise list \(\.npz\)"):
            load_noise_list(tmp_path / name)
    np.savez(tmp_path / "ok.npz", **arrays)
    loaded = load_noise_list(tmp_path / "ok.npz")
    assert isinstance(loaded, NoisePlan) and loaded.quality is None
    np.testing.assert_array_equal(loaded.label, plan.label)


def test_noise_list_for_checks_length(tmp_path: Path, two_sources) -> None:
    dir_a = two_sources[0]
    write_rec_subset(tmp_path, [dir_a], [[0, 0], [0, 1]], [0, 1], num_classes=2)
    assert noise_list_for(tmp_path) is None
    plan = plan_label_noise(np.arange(3), 0.0, 0.0, open_pool=0, seed=0)
    np.savez(tmp_path / "noise.npz", **plan.arrays())
    with pytest.raises(DataFormatError, match=r"noise\.npz: has 3 rows but .*train\.rec has 2"):
        noise_list_for(tmp_path / "train.rec")


# ---------------------------------------------------------------- command line


def test_cli_noise(tmp_path: Path, synth_train_dir: Path, open_source: Path, capsys) -> None:
    out = tmp_path / "noisy"
    argv = ["noise", str(synth_train_dir), "--out", str(out), "--setting", "MS1MCON-0.20"]
    assert main([*argv, "--open-source", str(open_source), "--seed", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| closed" in printed and "| open" in printed and str(out) in printed
    plan = load_noise_list(out / "noise.npz")
    # floor(8 * 0.15) = 1 closed and floor(8 * 0.05) = 0 open per class of 8
    assert plan.counts() == {"clean": 56, "closed": 8, "open": 0}
    assert json.loads((out / "noise.json").read_text())["setting"] == "MS1MCON-0.20"
    assert main([*argv, "--open-source", str(open_source), "--quiet"]) == 2  # no --overwrite
    assert "exists" in capsys.readouterr().err
    assert (
        main(["noise", str(synth_train_dir), "--out", str(tmp_path / "x"), "--setting", "Z"]) == 2
    )
    assert "unknown noise setting" in capsys.readouterr().err


def test_inject_noise_warns_when_small_classes_lose_the_rate(
    tmp_path: Path, synth_train_dir: Path, open_source: Path
) -> None:
    # 8 images per class: floor(8 * 0.05) = 0 open-set samples instead of 5%
    with pytest.warns(UserWarning, match=r"0\.0% open-set noise instead of 5\.0%"):
        info = inject_noise(synth_train_dir, tmp_path / "o", "MS1MCON-0.20",
                            open_source=open_source, progress=False)  # fmt: skip
    assert info.counts["open"] == 0 and info.counts["closed"] == 8


def test_inject_noise_refuses_unused_open_source_and_corrupt_manifest(
    tmp_path: Path, synth_train_dir: Path, open_source: Path
) -> None:
    with pytest.raises(ValueError, match="has no open-set noise"):
        inject_noise(synth_train_dir, tmp_path / "a", "C20", open_source=open_source,
                     progress=False)  # fmt: skip
    broken = tmp_path / "broken"
    shutil.copytree(synth_train_dir, broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(DataFormatError, match=r"manifest\.json.*not valid JSON"):
        inject_noise(broken, tmp_path / "b", "C20", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_summary_says_when_open_set_images_are_reused():
    """A pool smaller than the open samples is drawn with replacement (documented): the summary
    the CLI prints says so, with the count of distinct images (brute force: the set of sources)."""
    labels = np.repeat(np.arange(4), 10)
    small = plan_label_noise(labels, 0.0, 0.5, open_pool=5, seed=0)
    drawn = small.source_index[small.kind == OPEN]
    assert drawn.size == 20 and len(set(drawn.tolist())) <= 5
    assert noise_summary_table(small).splitlines()[-1] == (
        f"open: 20 samples from {len(set(drawn.tolist()))} distinct open-set images (a pool "
        "smaller than the open samples: images reused, drawn with replacement)"
    )
    large = plan_label_noise(labels, 0.0, 0.5, open_pool=100, seed=0)
    assert noise_summary_table(large).splitlines()[-1].startswith("| total")
