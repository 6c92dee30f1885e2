"""Splits and noise by image, and shard sizes: `dissect-fast shards` / `noise` on open_clip CSVs with several
captions per image (Flickr-style), checked by hashing the image bytes in the written shards."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from fixtures_ecosystem import openclip_csv

from dissect_fast.cli import main as cli_main
from dissect_fast.tools.csv_shards import csv_to_shards, grouped_noisy_permutation
from dissect_fast.tools.noise import add_noise
from dissect_fast.tools.writer import shard_sizes

ROOT = Path(__file__).resolve().parents[1]


def _flickr_csv(root: Path, images: int, captions: int, seed: int = 0) -> Path:
    """An open_clip CSV (tab separated, filepath/title) over ``images`` photos of the ecosystem fixture, each with
    ``captions`` captions, plus one photo copied under a second path (two rows): the same image under two names.
    Every caption is unique and names its photo (``#i``)."""
    base = openclip_csv(root, images, image_size=16, seed=seed)
    with open(base.csv, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    (base.images / "copy").mkdir()
    shutil.copy(base.images / rows[0]["filepath"], base.images / "copy" / "again.jpg")
    out = [(r["filepath"], f"{r['title']} #{i} view {k}") for i, r in enumerate(rows) for k in range(captions)]
    out += [("copy/again.jpg", f"{rows[0]['title']} #0 copy {k}") for k in range(2)]
    path = root / "flickr.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["filepath", "title"])
        w.writerows(out)
    return path


def _read_split(folder: Path) -> list[dict]:
    """Per sample of the shards in ``folder``: the hash of its image bytes, its caption and clean flag (None if
    absent), read with tarfile (the shards' own format, not the project's reader)."""
    by_key: dict[str, dict] = {}
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                key, ext = m.name.split(".", 1)
                data = t.extractfile(m).read()
                by_key.setdefault(f"{tar.name}/{key}", {})[ext] = data
    return [
        {
            "image": hashlib.sha256(s["jpg"]).hexdigest(),
            "caption": s["txt"].decode(),
            "clean": s["clean"][0] if "clean" in s else None,
        }
        for s in by_key.values()
    ]


def _photo_of_caption(caption: str) -> int:
    return int(caption.split("#")[1].split()[0])


def test_shards_val_fraction_holds_out_whole_images(tmp_path):
    """No image (by its bytes) is in both OUT/train and OUT/val; every row is written once; the copy of photo 0
    under another path goes with photo 0."""
    csv_path = _flickr_csv(tmp_path, images=40, captions=5)
    images = tmp_path / "images"
    out = tmp_path / "out"
    rc = cli_main(
        ["shards", "--csv", str(csv_path), "--images", str(images), "--out", str(out), "--val-fraction", "0.2"]
    )
    assert rc == 0
    train, val = _read_split(out / "train"), _read_split(out / "val")
    train_images, val_images = {s["image"] for s in train}, {s["image"] for s in val}
    assert val_images and not train_images & val_images
    assert len(train) + len(val) == 40 * 5 + 2
    assert abs(len(val) - 0.2 * 202) <= 7  # whole images: off by less than one image's rows
    assert len({_photo_of_caption(s["caption"]) for s in val}) == len(val_images)  # one photo per image hash
    for s in train + val:  # each sample keeps one of its own photo's captions (no noise asked)
        assert s["clean"] is None


def test_shards_noise_never_gives_a_caption_of_the_same_image(tmp_path):
    """Few images with many captions: a row-level shuffle gives some noisy pairs another caption of their own photo.
    By image: every pair flagged noisy shows another photo, every pair flagged clean its own."""
    csv_path = _flickr_csv(tmp_path, images=6, captions=10)
    out = tmp_path / "out"
    train, _, _ = csv_to_shards(str(csv_path), str(tmp_path / "images"), str(out), noise=0.5, seed=1, progress=False)
    samples = _read_split(out / "train")
    photo_of_image = {}
    for s in samples:  # the image hash of each photo, from the clean pairs
        if s["clean"]:
            photo_of_image[s["image"]] = _photo_of_caption(s["caption"])
    assert len(photo_of_image) == 6  # 6 photos (photo 0 and its copy: one image)
    noisy = [s for s in samples if s["clean"] == 0]
    assert len(noisy) == round(0.5 * train.num_samples)
    for s in samples:
        same = photo_of_image[s["image"]] == _photo_of_caption(s["caption"])
        assert same == bool(s["clean"]), s


def test_noise_command_groups_by_image_in_csv_and_shards(tmp_path):
    """`dissect-fast noise` on the CSV (rows by file and bytes) and on shards (samples by image bytes): a moved
    caption always comes from another image; exact noisy share."""
    csv_path = _flickr_csv(tmp_path, images=6, captions=10, seed=2)
    r = add_noise(str(csv_path), str(tmp_path / "noisy-csv"), 0.5, 3, images=str(tmp_path / "images"), progress=False)
    with open(csv_path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))

    def image_of_row(i: int) -> str:
        return hashlib.sha256((tmp_path / "images" / rows[i]["filepath"]).read_bytes()).hexdigest()

    moved = r.caption_source != r.ids
    assert moved.sum() == round(0.5 * len(rows)) and np.array_equal(~moved, r.clean.astype(bool))
    for i, j in zip(r.ids[moved], r.caption_source[moved]):
        assert image_of_row(int(i)) != image_of_row(int(j))

    # the noisy shards as input: 60 samples over 7 paths (6 distinct images); noise them again
    s = add_noise(str(tmp_path / "noisy-csv"), str(tmp_path / "noisy-shards"), 0.5, 4, workers=1, progress=False)
    moved = s.caption_source != s.ids
    assert s.ids.size == r.ids.size and moved.sum() == round(0.5 * s.ids.size)
    for i, j in zip(s.ids[moved], s.caption_source[moved]):  # ids are the CSV's row numbers
        assert image_of_row(int(i)) != image_of_row(int(j)), (i, j)


def test_val_fraction_with_one_image_is_refused(tmp_path):
    csv_path = _flickr_csv(tmp_path, images=1, captions=4)
    (tmp_path / "images" / "copy" / "again.jpg").unlink()  # one photo, one file: one image
    with pytest.raises(ValueError, match="--val-fraction 0.5: the rows show one image only"):
        csv_to_shards(str(csv_path), str(tmp_path / "images"), str(tmp_path / "o"), val_fraction=0.5, progress=False)


def test_grouped_permutation_rules():
    """Distinct images: the ungrouped rule's draw (same seed, same result). Two images: every moved row lands on the
    other image. One image: nothing can move (a warning)."""
    from dissect_fast.tools.synthetic import noisy_permutation

    src, clean = grouped_noisy_permutation(np.arange(500), 0.3, np.random.default_rng(7))
    ref_src, ref_clean = noisy_permutation(500, 0.3, np.random.default_rng(7))
    assert np.array_equal(src, ref_src) and np.array_equal(clean, ref_clean)
    groups = np.repeat([0, 1], 20)
    for seed in range(20):
        src, clean = grouped_noisy_permutation(groups, 0.4, np.random.default_rng(seed))
        moved = np.flatnonzero(~clean)
        assert moved.size == 16 and (groups[src[moved]] != groups[moved]).all()
        assert np.array_equal(np.sort(src), np.arange(40))  # a permutation: each caption used once
    src, clean = grouped_noisy_permutation(np.zeros(10, dtype=np.int64), 0.5, np.random.default_rng(0))
    assert clean.all()


def test_shard_count_for_ranks_and_workers(tmp_path):
    """2,700 pairs for 2 ranks x 2 workers: >= 8 shards per reader (32), sizes within one sample of each other
    (1,000-sample shards gave 3 shards: readers ran out and repeated shards)."""
    base = openclip_csv(tmp_path, 27, image_size=16)
    with open(base.csv, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    big = tmp_path / "big.csv"
    with open(big, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["filepath", "title"])
        w.writerows((r["filepath"], f"{r['title']} {k}") for r in rows for k in range(100))
    out = tmp_path / "out"
    argv = ["shards", "--csv", str(big), "--images", str(base.images), "--out", str(out)]
    assert cli_main([*argv, "--world-size", "2", "--workers", "2"]) == 0
    index = json.loads((out / "train" / "index.json").read_text())
    counts = [s["count"] for s in index["shards"]]
    assert sum(counts) == 2700 and len(counts) >= 8 * 2 * 2
    assert max(counts) - min(counts) <= 1


def test_shard_sizes_bounds():
    assert shard_sizes(50) == [50]  # small sets: one shard rather than shards of a few samples
    sizes = shard_sizes(10_000_000)
    assert sum(sizes) == 10_000_000 and max(sizes) <= 10_000
    assert shard_sizes(2500, samples_per_shard=1000) == [1000, 1000, 500]
    assert len(shard_sizes(100_000, world_size=4, workers=4)) == 8 * 4 * 4


def test_photo_grid_skips_training_copies_of_validation_images(tmp_path):
    from benchmarks.harness import train_images

    base = openclip_csv(tmp_path, 5, image_size=16)
    files = sorted(p.relative_to(base.images).as_posix() for p in base.images.rglob("*.jpg"))
    shutil.copy(base.images / files[4], base.images / "00" / "zz-copy-of-val.jpg")  # a val photo under a train name
    train = train_images(str(base.images), [*files[:3], "00/zz-copy-of-val.jpg", files[3]], [files[4]], 4)
    assert train == [*files[:3], files[3]]
