"""Each dataset reader on a miniature copy of its official layout."""

from __future__ import annotations

import gzip
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dcml.contracts import manifest
from dcml.contracts.errors import DcmlError
from data_prep import cars196, cub200, fashion_mnist, folder, inshop, registry, sop, synthetic, vehicleid


def labels_of(df, split):
    return set(df.loc[df["split"] == split, "label"])


def as_objects(df):
    """Values as Python objects with None for missing, so dtype details do not matter."""
    df = df.astype(object)
    return df.where(df.notna(), None)


def round_trip(df, meta, tmp_path):
    """The reader's output is a valid manifest that reads back unchanged."""
    out = tmp_path / "m.parquet"
    manifest.write(out, df, meta)
    back = manifest.read(out)
    pd.testing.assert_frame_equal(as_objects(back.df), as_objects(df))
    return back


# -- fashion-mnist ---------------------------------------------------------

def test_fashion_mnist_official_embeds_the_idx_pixels(tmp_path):
    arrays = synthetic.fashion_mnist(tmp_path / "fm", train_per_class=3, test_per_class=2)
    df, meta = fashion_mnist.read(tmp_path / "fm")
    assert (df["split"] == "train").sum() == 30 and (df["split"] == "test").sum() == 20
    assert labels_of(df, "train") == labels_of(df, "test") == set(range(10))
    assert df["path"].isna().all()
    assert dict(zip(df["label"], df["class_name"]))[9] == "Ankle boot"
    for image_id in ("train/00007", "t10k/00013"):
        row = df.set_index("image_id").loc[image_id]
        part, index = image_id.split("/")
        decoded = np.array(Image.open(io.BytesIO(row["image_bytes"])))
        np.testing.assert_array_equal(decoded, arrays[part][0][int(index)])
        assert row["label"] == arrays[part][1][int(index)]
    assert meta["dataset"] == "fashion-mnist" and meta["root"] == str(tmp_path / "fm")
    assert meta["split_mode"] == "official" and len(meta["fingerprint"]) == 64
    round_trip(df, meta, tmp_path)


def test_fashion_mnist_class_disjoint_uses_all_images(tmp_path):
    synthetic.fashion_mnist(tmp_path, train_per_class=3, test_per_class=2)
    df, meta = fashion_mnist.read(tmp_path, "class-disjoint")
    assert len(df) == 50
    assert labels_of(df, "train") == {0, 1, 2, 3, 4} and labels_of(df, "test") == {5, 6, 7, 8, 9}
    assert df.groupby("label").size().eq(5).all()
    assert meta["split_mode"] == "class-disjoint"


def test_fashion_mnist_torchvision_layout_and_fingerprint_ignores_compression(tmp_path):
    synthetic.fashion_mnist(tmp_path / "gz", seed=3)
    synthetic.fashion_mnist(tmp_path / "tv" / "FashionMNIST" / "raw", compress=False, seed=3)
    _, meta_gz = fashion_mnist.read(tmp_path / "gz", max_per_class=2)
    df, meta_tv = fashion_mnist.read(tmp_path / "tv", max_per_class=2)
    assert meta_tv["root"] == str(tmp_path / "tv" / "FashionMNIST" / "raw")
    assert meta_gz["fingerprint"] == meta_tv["fingerprint"]
    assert len(df) == 40  # 2 per class and split
    synthetic.fashion_mnist(tmp_path / "other", seed=4)
    assert fashion_mnist.read(tmp_path / "other", max_per_class=2)[1]["fingerprint"] != meta_gz["fingerprint"]


def test_fashion_mnist_found_without_root(tmp_path, monkeypatch):
    synthetic.fashion_mnist(tmp_path / "system")
    monkeypatch.setattr(fashion_mnist, "default_roots", lambda: [tmp_path / "missing", tmp_path / "system"])
    assert fashion_mnist.locate(None) == tmp_path / "system"
    df, meta = fashion_mnist.read(None)
    assert meta["root"] == str(tmp_path / "system") and len(df) == 50
    monkeypatch.setattr(fashion_mnist, "default_roots", lambda: [tmp_path / "missing"])
    with pytest.raises(DcmlError, match="dataset-fashion-mnist"):
        fashion_mnist.locate(None, allow_download=False)


def test_fashion_mnist_truncated_idx_is_an_error(tmp_path):
    synthetic.fashion_mnist(tmp_path)
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:-100]))
    with pytest.raises(DcmlError, match=r"t10k-images-idx3-ubyte.gz: truncated IDX"):
        fashion_mnist.read(tmp_path)
    images.write_bytes(images.read_bytes()[:50])
    with pytest.raises(DcmlError, match=r"t10k-images-idx3-ubyte.gz: corrupt or truncated gzip"):
        fashion_mnist.read(tmp_path)


# -- cars196 ---------------------------------------------------------------

CARS = {1: 3, 2: 2, 98: 2, 99: 3, 196: 2}


def test_cars196_official_mat_layout(tmp_path):
    synthetic.cars196_official(tmp_path / "stanford_cars", CARS)
    df, meta = cars196.read(tmp_path)  # the parent of the unpacked folder works too
    tmp_path = tmp_path / "stanford_cars"
    assert meta["root"] == str(tmp_path)
    assert len(df) == 12
    assert labels_of(df, "train") == {1, 2, 98} and labels_of(df, "test") == {99, 196}
    assert df.groupby("label").size().to_dict() == CARS
    assert dict(zip(df["label"], df["class_name"]))[99] == "Make Model 099 2012"
    assert df["path"].str.match(r"^car_ims/\d{6}\.jpg$").all() and (df["image_id"] == df["path"]).all()
    assert all((tmp_path / p).is_file() for p in df["path"])
    round_trip(df, meta, tmp_path)


def test_cars196_class_folder_layout(tmp_path):
    synthetic.cars196_folders(tmp_path / "cars", CARS)
    df, meta = cars196.read(tmp_path / "cars")
    assert df.groupby("label").size().to_dict() == CARS
    assert labels_of(df, "train") == {1, 2, 98} and labels_of(df, "test") == {99, 196}
    assert dict(zip(df["label"], df["class_name"]))[196] == "Make_Model_196_2012"
    assert df["path"].str.startswith("196.Make_Model_196_2012/").sum() == 2
    # class-disjoint is the official protocol already
    assert cars196.read(tmp_path / "cars", "class-disjoint")[0]["split"].tolist() == df["split"].tolist()
    round_trip(df, meta, tmp_path)


def test_cars196_fingerprint_follows_the_files(tmp_path):
    root = synthetic.cars196_folders(tmp_path / "cars", CARS)
    first = cars196.read(root)[1]["fingerprint"]
    assert cars196.read(root)[1]["fingerprint"] == first
    victim = next((root / "099.Make_Model_099_2012").iterdir())
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert cars196.read(root)[1]["fingerprint"] != first


def test_max_per_class_keeps_the_first_image_ids(tmp_path):
    synthetic.cars196_folders(tmp_path, {1: 5, 99: 4})
    full, _ = cars196.read(tmp_path)
    df, _ = cars196.read(tmp_path, max_per_class=3)
    assert df.groupby("label").size().to_dict() == {1: 3, 99: 3}
    expected = full.sort_values("image_id").groupby("label").head(3)["image_id"]
    assert set(df["image_id"]) == set(expected)


# -- cub200 ----------------------------------------------------------------

def test_cub200_official_layout_under_its_archive_folder(tmp_path):
    synthetic.cub200(tmp_path / "CUB_200_2011", {1: 2, 100: 3, 101: 2, 200: 2})
    df, meta = cub200.read(tmp_path)  # the parent of CUB_200_2011/
    assert meta["root"] == str(tmp_path / "CUB_200_2011")
    assert len(df) == 9
    assert labels_of(df, "train") == {1, 100} and labels_of(df, "test") == {101, 200}
    assert dict(zip(df["label"], df["class_name"]))[101] == "Bird_101"
    assert df["path"].str.startswith("images/101.Bird_101/").sum() == 2
    round_trip(df, meta, tmp_path)


def test_cub200_malformed_line_names_file_and_line(tmp_path):
    root = synthetic.cub200(tmp_path, {1: 2, 101: 2})
    with open(root / "image_class_labels.txt", "a") as f:
        f.write("five 3\n")
    with pytest.raises(DcmlError, match=r"image_class_labels.txt:5: expected '<id> <class id>'"):
        cub200.read(root)


# -- sop -------------------------------------------------------------------

def test_sop_official_layout(tmp_path):
    synthetic.sop(tmp_path, train={1: 2, 2: 3}, test={3: 2, 4: 2})
    df, meta = sop.read(tmp_path)
    assert len(df) == 9
    assert labels_of(df, "train") == {1, 2} and labels_of(df, "test") == {3, 4}
    names = dict(zip(df["label"], df["class_name"]))
    assert names[1] == "chair_1" and names[2] == "bicycle_2"
    assert df["path"].str.match(r"^(bicycle|chair)_final/\d+_\d\.JPG$").all()
    round_trip(df, meta, tmp_path)


# -- inshop ----------------------------------------------------------------

@pytest.mark.parametrize("archive_layout", [False, True])
def test_inshop_train_query_gallery(tmp_path, archive_layout):
    synthetic.inshop(tmp_path, train={1: 2, 2: 3}, query={3: 1, 4: 2}, gallery={3: 2, 4: 1},
                     archive_layout=archive_layout)
    df, meta = inshop.read(tmp_path)
    assert df["split"].value_counts().to_dict() == {"train": 5, "query": 3, "gallery": 3}
    assert labels_of(df, "train") == {1, 2}
    assert labels_of(df, "query") == labels_of(df, "gallery") == {3, 4}
    assert dict(zip(df["label"], df["class_name"]))[3] == "id_00000003"
    prefix = "Img/img/" if archive_layout else "img/"
    assert df["path"].str.startswith(prefix).all()
    round_trip(df, meta, tmp_path)


# -- vehicleid -------------------------------------------------------------

def test_vehicleid_test_sizes(tmp_path):
    synthetic.vehicleid(tmp_path, train={1: 2, 2: 3},
                        tests={800: {10: 2, 11: 2}, 1600: {10: 2, 11: 2, 12: 3}})
    df, meta = vehicleid.read(tmp_path)
    assert (df["split"] == "train").sum() == 5 and (df["split"] == "test").sum() == 4
    assert labels_of(df, "train") == {1, 2} and labels_of(df, "test") == {10, 11}
    assert df["path"].str.match(r"^image/\d{7}\.jpg$").all()
    round_trip(df, meta, tmp_path)
    df1600, _ = vehicleid.read(tmp_path, test_size=1600)
    assert labels_of(df1600, "test") == {10, 11, 12} and (df1600["split"] == "test").sum() == 7
    with pytest.raises(DcmlError, match=r"test_list_2400.txt: missing"):
        vehicleid.read(tmp_path, test_size=2400)
    with pytest.raises(DcmlError, match="800, 1600, 2400"):
        vehicleid.read(tmp_path, test_size=500)


# -- folder ----------------------------------------------------------------

def test_folder_flat_class_disjoint_by_sorted_halves(tmp_path):
    synthetic.folder(tmp_path, {"ant": 2, "bee": 3, "cat": 2, "dog": 2, "eel": 2})
    df, meta = registry.read_dataset("folder", tmp_path)  # default split mode
    assert meta["split_mode"] == "class-disjoint"
    names = dict(zip(df["class_name"], df["label"]))
    assert names == {"ant": 0, "bee": 1, "cat": 2, "dog": 3, "eel": 4}
    assert labels_of(df, "train") == {0, 1, 2} and labels_of(df, "test") == {3, 4}
    round_trip(df, meta, tmp_path)
    with pytest.raises(DcmlError, match="no train/ and test/ split folders"):
        folder.read(tmp_path, "official")


def test_folder_split_layout(tmp_path):
    synthetic.folder(tmp_path, {"ant": 2, "bee": 2, "eel": 3}, split="train")
    synthetic.folder(tmp_path, {"cat": 2, "dog": 3}, split="test")
    df, _ = folder.read(tmp_path, "official")
    assert set(df.loc[df["split"] == "train", "class_name"]) == {"ant", "bee", "eel"}
    assert set(df.loc[df["split"] == "test", "class_name"]) == {"cat", "dog"}
    assert df["path"].str.match(r"^(train|test)/[a-z]+/\d{3}\.png$").all()
    # class-disjoint re-splits the sorted classes: ant bee cat | dog eel
    df, _ = folder.read(tmp_path, "class-disjoint")
    assert set(df.loc[df["split"] == "train", "class_name"]) == {"ant", "bee", "cat"}
    assert set(df.loc[df["split"] == "test", "class_name"]) == {"dog", "eel"}


def test_folder_symlink_loop_inside_root_is_visited_once(tmp_path):
    synthetic.folder(tmp_path, {"ant": 2, "bee": 2})
    (tmp_path / "ant" / "again").symlink_to(tmp_path / "ant")
    df, _ = folder.read(tmp_path)
    assert len(df) == 4


# -- registry --------------------------------------------------------------

def test_registry_names_and_aliases():
    assert registry.names() == ["fashion-mnist", "cars196", "cub200", "sop", "inshop", "vehicleid", "folder"]
    assert registry.get_reader("fashion_mnist") is fashion_mnist.read
    assert registry.get_reader("CARS196") is cars196.read
    with pytest.raises(DcmlError, match="unknown dataset; use one of fashion-mnist"):
        registry.get_reader("imagenet")
    with pytest.raises(DcmlError, match="--split-mode random: not supported"):
        registry.read_dataset("cars196", "/nonexistent", "random")


# -- make fashion-mnist ----------------------------------------------------

def test_fetch_prints_the_folder_it_finds(tmp_path, monkeypatch, capsys):
    from data_prep import fashion_mnist_fetch

    synthetic.fashion_mnist(tmp_path / "system")
    monkeypatch.setattr(fashion_mnist, "default_roots", lambda: [tmp_path / "system"])
    monkeypatch.setattr(fashion_mnist, "download", lambda dest=None: pytest.fail("must not download"))
    assert fashion_mnist_fetch.main() == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "system")


def test_fetch_falls_back_to_apt_as_root_then_fails_clearly(tmp_path, monkeypatch, capsys):
    from data_prep import fashion_mnist_fetch

    def no_network(dest=None):
        raise DcmlError(f"{dest}: downloading Fashion-MNIST with torchvision failed (URLError)")

    commands = []

    def fake_apt(cmd, **kwargs):
        commands.append(cmd)
        if cmd[:2] == ["apt-get", "install"]:
            synthetic.fashion_mnist(tmp_path / "system")
        return subprocess_result(0)

    monkeypatch.setattr(fashion_mnist, "default_roots", lambda: [tmp_path / "system"])
    monkeypatch.setattr(fashion_mnist, "download", no_network)
    monkeypatch.setattr(fashion_mnist_fetch.subprocess, "run", fake_apt)
    monkeypatch.setattr(fashion_mnist_fetch.os, "geteuid", lambda: 0)
    assert fashion_mnist_fetch.main() == 0
    assert commands == [["apt-get", "install", "-y", "dataset-fashion-mnist"]]
    assert capsys.readouterr().out.strip() == str(tmp_path / "system")

    monkeypatch.setattr(fashion_mnist, "default_roots", lambda: [tmp_path / "nothing"])
    monkeypatch.setattr(fashion_mnist_fetch.os, "geteuid", lambda: 1000)
    assert fashion_mnist_fetch.main() == 2
    err = capsys.readouterr().err
    assert err.startswith("error: /usr/share/datasets/fashion-mnist: Fashion-MNIST is not installed")
    assert "URLError" in err and "not root" in err and "sudo apt-get install -y dataset-fashion-mnist" in err


def subprocess_result(returncode):
    import subprocess

    return subprocess.CompletedProcess(args=[], returncode=returncode)
