"""LUABFineTuner checkpoints: content fingerprints, checksums, and checkpoint_dir checked before training."""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from test_finetune import assert_same_state, make_scenes, state_of, tiny

from luab_sk.estimators.finetune import LUABFineTuner, _items_key


def _write_pngs(directory, images):
    paths = []
    for i, img in enumerate(images):
        paths.append(str(directory / f"{i}.png"))
        Image.fromarray(img).save(paths[-1])
    return paths


def _no_training(monkeypatch):
    """Make any epoch of training fail the test."""

    def fail(*args, **kwargs):
        raise AssertionError("an epoch was trained")

    monkeypatch.setattr(LUABFineTuner, "_train_epoch", fail)


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(8)


@pytest.fixture(scope="module")
def fresh(scenes):
    """A fit without checkpoints: what a fit that must start from scratch has to reproduce."""
    X, y, Z = scenes
    return tiny(max_iter=2).fit(X, y, Z=Z)


# ------------------------------------------------------------------------------------ fingerprints
def test_rewritten_images_at_the_same_paths_are_not_resumed(tmp_path, monkeypatch):
    X, y, Z = make_scenes(8, seed=0)
    new_X = make_scenes(8, seed=1)[0]
    paths = _write_pngs(tmp_path, X)
    ckpt = tmp_path / "ckpt"
    old = tiny(checkpoint_dir=ckpt).fit(paths, y, Z=Z)

    _write_pngs(tmp_path, new_X)  # other pixels, same paths
    with pytest.raises(ValueError, match="last.pt.*other parameters or data"):
        tiny(checkpoint_dir=ckpt).fit(paths, y, Z=Z)

    retrained = tiny(checkpoint_dir=ckpt, resume=False).fit(paths, y, Z=Z)
    reference = tiny().fit(new_X, y, Z=Z)
    assert_same_state(state_of(retrained.model_), state_of(reference.model_))
    assert not np.array_equal(retrained.predict_proba(new_X), old.predict_proba(new_X))

    # Rewriting the same bytes (a new modification time) still resumes, without training.
    _write_pngs(tmp_path, new_X)
    _no_training(monkeypatch)
    resumed = tiny(checkpoint_dir=ckpt).fit(paths, y, Z=Z)
    assert_same_state(state_of(resumed.model_), state_of(retrained.model_))


def test_fingerprint_follows_pil_and_array_content():
    X = make_scenes(3)[0]
    pil = [Image.fromarray(x) for x in X]
    arrays = [x.copy() for x in X]
    before = (_items_key(X), _items_key(pil), _items_key(arrays))
    X[1, 0, 0, 0] ^= 1
    pil[1].putpixel((0, 0), (0, 0, 0) if pil[1].getpixel((0, 0)) != (0, 0, 0) else (1, 1, 1))
    arrays[1][0, 0, 0] ^= 1
    after = (_items_key(X), _items_key(pil), _items_key(arrays))
    assert before[0] != after[0]
    for kind in (1, 2):
        assert before[kind][0] == after[kind][0] and before[kind][2] == after[kind][2]
        assert before[kind][1] != after[kind][1]


# ------------------------------------------------------------------------------------ checksums
def _flip_bytes(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_record(path):
    (path.parent / "last.pt.json").unlink()


def _garble_record(path):
    (path.parent / "last.pt.json").write_text("{not json")


def _unloadable_with_valid_record(path):
    """Bytes torch cannot load, with a record that matches them (checksum and fingerprint)."""
    path.write_bytes(b"not a torch file")
    record_path = path.parent / "last.pt.json"
    record = json.loads(record_path.read_text())
    record["sha256"] = hashlib.sha256(b"not a torch file").hexdigest()
    record_path.write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_flip_bytes, "do not match the SHA-256"),
        (_truncate, "do not match the SHA-256"),
        (_drop_record, "missing or unreadable"),
        (_garble_record, "missing or unreadable"),
        (_unloadable_with_valid_record, "torch cannot load it"),
    ],
)
def test_damaged_checkpoint_is_set_aside_and_training_restarts(tmp_path, scenes, fresh, damage, reason):
    X, y, Z = scenes
    tiny(max_iter=2, checkpoint_dir=tmp_path).fit(X, y, Z=Z)
    checkpoint = tmp_path / "last.pt"
    damage(checkpoint)
    damaged = checkpoint.read_bytes()

    pattern = f"{re.escape(str(checkpoint))}' failed verification \\(.*{reason}"
    with pytest.warns(RuntimeWarning, match=pattern) as record:
        ft = tiny(max_iter=2, checkpoint_dir=tmp_path).fit(X, y, Z=Z)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert ft.n_iter_ == 2 and len(ft.loss_curve_) == 2  # trained from scratch
    assert_same_state(state_of(ft.model_), state_of(fresh.model_))
    np.testing.assert_array_equal(ft.predict_proba(X), fresh.predict_proba(X))
    # The damaged file is kept aside; a new verified checkpoint took its place.
    assert (tmp_path / "last.pt.corrupt").read_bytes() == damaged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = tiny(max_iter=2, checkpoint_dir=tmp_path).fit(X, y, Z=Z)
    assert_same_state(state_of(again.model_), state_of(fresh.model_))


def test_checkpoint_record_holds_the_checksum_and_loads_weights_only(tmp_path, scenes):
    X, y, Z = scenes
    tiny(checkpoint_dir=tmp_path).fit(X, y, Z=Z)
    record = json.loads((tmp_path / "last.pt.json").read_text())
    assert record["sha256"] == hashlib.sha256((tmp_path / "last.pt").read_bytes()).hexdigest()
    assert record["epoch"] == 1
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.json"]  # no temporary left


# ------------------------------------------------------------------------------------ checkpoint_dir
def test_checkpoint_dir_that_is_a_file_fails_before_training(tmp_path, monkeypatch, scenes):
    X, y, Z = scenes
    a_file = tmp_path / "not_a_dir"
    a_file.write_text("")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(LUABFineTuner, "_build_model", no_model)
    _no_training(monkeypatch)
    with pytest.raises(ValueError, match="checkpoint_dir=.*not_a_dir'? is a file, not a directory"):
        tiny(checkpoint_dir=a_file).fit(X, y, Z=Z)
    with pytest.raises(ValueError, match="checkpoint_dir=.*not_a_dir/sub'? is not a writable directory"):
        tiny(checkpoint_dir=a_file / "sub").fit(X, y, Z=Z)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions, not root")
def test_unwritable_checkpoint_dir_fails_before_training(tmp_path, monkeypatch, scenes):
    X, y, Z = scenes
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    _no_training(monkeypatch)
    try:
        with pytest.raises(ValueError, match="checkpoint_dir=.*locked'? is not a writable directory"):
            tiny(checkpoint_dir=locked).fit(X, y, Z=Z)
    finally:
        locked.chmod(0o700)


def test_missing_checkpoint_dir_is_created(tmp_path, scenes):
    X, y, Z = scenes
    tiny(checkpoint_dir=tmp_path / "a" / "b").fit(X, y, Z=Z)
    assert (tmp_path / "a" / "b" / "last.pt").is_file()
