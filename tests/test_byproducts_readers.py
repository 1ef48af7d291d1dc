"""Readers of ImageNet-AB XML and COCO-AB JSON, and the generators that write them."""

import io
import json
import os
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from luab_sk.byproducts import (
    ByproductFormatError,
    ByproductRecords,
    ImageNetABRecord,
    coco_key,
    imagenet_key,
    iter_coco_ab,
    iter_imagenet_ab_chunks,
    list_imagenet_ab_files,
    parse_imagenet_ab_xml,
    read_coco_ab,
    read_imagenet_ab,
)
from luab_sk.byproducts.coco_ab import _iter_json_list
from luab_sk.datasets.imagenet_ab_like import make_coco_ab_like, make_imagenet_ab_like

QUIRKY_XML = """<?xml version="1.0"?>
<annotation>
  <folder>n01440764</folder><filename>n01440764_18</filename>
  <size><width>400</width><height>300</height><depth>3</depth></size>
  <object><name>n01440764</name><bndbox><xmin>10</xmin><ymin>20</ymin><xmax>200</xmax><ymax>250</ymax></bndbox>
  </object>
  <metadata>
    <selected>True</selected>
    <selectedRecord><x>0.2</x><y>0.4</y><time>1633000001000</time></selectedRecord>
    <selectedCount>2</selectedCount>
    <mouseTracking><time>1633000000900</time><x>0.5</x><y>0.5</y>
                   <time>1633000000950</time><x>0.3</x><y>0.45</y></mouseTracking>
    <hoveredRecord><action>enter</action><time>1633000000000</time></hoveredRecord>
    <hoveredRecord><action>leave</action><time>1633000000400</time></hoveredRecord>
    <hoveredCount>1</hoveredCount>
    <estimateTime>0</estimateTime>
    <imageWidth>200</imageWidth><imageHeight>150</imageHeight>
    <originalImageWidth>400</originalImageWidth><originalImageHeight>300</originalImageHeight>
    <imagePosition><x>30</x><y>40</y></imagePosition>
    <image_idx>47</image_idx><page_idx>9</page_idx>
    <worker_id>W1</worker_id><assignment_id>A1</assignment_id><hit_id>H1</hit_id>
    <hit_submit_time>2021-09-30T11:06:41Z</hit_submit_time><imagenet_hit_id>77</imagenet_hit_id>
    <brandNewField>kept</brandNewField>
  </metadata>
  <metadata>
    <selected>False</selected>
    <selectedRecord>None</selectedRecord>
    <mouseTracking>None</mouseTracking>
    <hoveredRecord>None</hoveredRecord>
    <hoveredCount>0</hoveredCount>
    <estimateTime>0</estimateTime>
    <hit_submit_time>1633000090000</hit_submit_time>
  </metadata>
  <metadata>
    <selected>True</selected>
    <selectedRecord><x>0.4</x><y>0.6</y><time>1633000005000</time></selectedRecord>
    <mouseTracking/>
  </metadata>
</annotation>
"""


@pytest.fixture(scope="module")
def imagenet_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagenet_ab")
    truth = make_imagenet_ab_like(folder, n_classes=3, n_per_class=6, n_malformed=3, random_state=0)
    return folder, truth


@pytest.fixture(scope="module")
def coco_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("coco_ab") / "coco_ab.json"
    truth = make_coco_ab_like(path, n_images=40, n_malformed=2, truncate=True, random_state=0)
    return path, truth


# -- ImageNet-AB --------------------------------------------------------------------------------------------


def test_quirky_xml_parses_every_field(tmp_path):
    path = tmp_path / "n01440764" / "n01440764_18.xml"
    path.parent.mkdir()
    path.write_text(QUIRKY_XML)
    rec = parse_imagenet_ab_xml(path)
    assert rec.key == "n01440764/n01440764_18" and rec.size == (400.0, 300.0)
    np.testing.assert_array_equal(rec.ilsvrc_boxes, [[10, 20, 200, 250]])
    assert rec.ilsvrc_names == ("n01440764",)
    first, second, third = rec.tasks
    assert first.selected and not second.selected and third.selected
    assert first.point == (0.2, 0.4) and first.selected_time == 1633000001000
    # Both trace layouts: triples inside one element here, one element per sample in generated files.
    np.testing.assert_array_equal(first.trace, [[1633000000900, 0.5, 0.5], [1633000000950, 0.3, 0.45]])
    assert first.hover_actions == ("enter", "leave")
    np.testing.assert_array_equal(first.hover_times, [1633000000000, 1633000000400])
    assert first.estimate_time == 0 and first.hovered_count == 1 and first.selected_count == 2
    assert first.image_size == (200, 150) and first.original_image_size == (400, 300)
    assert first.image_position == (30, 40) and first.image_idx == 47 and first.page_idx == 9
    ids = (first.worker_id, first.assignment_id, first.hit_id, first.imagenet_hit_id)
    assert ids == ("W1", "A1", "H1", "77")
    assert first.hit_submit_time == 1633000001000  # ISO date -> epoch ms
    assert second.hit_submit_time == 1633000090000
    assert first.extra == {"brandNewField": "kept"}
    assert second.trace.shape == (0, 3) and np.isnan(second.point).all() and third.trace.shape == (0, 3)
    # The reference loader's Z: the mean click over selected tasks.
    np.testing.assert_allclose(rec.point, [0.3, 0.5])
    assert parse_imagenet_ab_xml(path, traces=False).tasks[0].trace.shape == (0, 3)


def test_folder_read_skips_junk_and_reports_bad_files(imagenet_folder):
    folder, truth = imagenet_folder
    assert truth.junk, "the generator should have written AppleDouble files"
    assert not any(os.path.basename(p).startswith("._") for p in list_imagenet_ab_files(folder))
    records = read_imagenet_ab(folder, on_error="skip")
    assert len(records) == len(truth.paths) - 3
    assert sorted(e.path for e in records.errors) == sorted(truth.malformed)
    reasons = " | ".join(e.reason for e in records.errors)
    assert "ParseError" in reasons and "not a number" in reasons and "EntitiesForbidden" in reasons
    aligned = records.align(truth.image_keys)
    z = np.array([r.point if r is not None else (np.nan, np.nan) for r in aligned])
    np.testing.assert_allclose(z, truth.points, equal_nan=True)
    # Boxes embedded by the generator come back as ilsvrc_boxes.
    for rec, boxes in zip(aligned, truth.ilsvrc_boxes):
        if rec is not None:
            np.testing.assert_array_equal(rec.ilsvrc_boxes, boxes)


def test_on_error_raise_names_the_file(imagenet_folder):
    folder, truth = imagenet_folder
    with pytest.raises(ByproductFormatError) as info:
        read_imagenet_ab(folder)
    assert info.value.path in truth.malformed and info.value.path in str(info.value)


def test_keys_select_and_missing_files_give_missing_rows(imagenet_folder):
    folder, truth = imagenet_folder
    good = [k for k, p in zip(truth.image_keys, truth.paths) if p not in truth.malformed]
    wanted = [good[3] + ".JPEG", "n99999999_1.JPEG", good[0]]
    records = read_imagenet_ab(folder, wanted)
    assert records.keys == [imagenet_key(good[3]), good[0]]
    aligned = records.align(wanted)
    assert aligned[1] is None and aligned[0].key == imagenet_key(good[3])
    # The same from an explicit list of paths (AppleDouble entries are ignored).
    from_list = read_imagenet_ab(list(truth.paths) + truth.junk, wanted)
    assert from_list.keys == records.keys


def test_chunks_keep_order_and_raise_at_the_first_bad_chunk(imagenet_folder):
    folder, truth = imagenet_folder
    paths = sorted(truth.paths)
    chunks = list(iter_imagenet_ab_chunks(folder, on_error="skip", chunk_size=5))
    assert [len(c) + len(c.errors) for c in chunks] == [5, 5, 5, 3]
    assert [k for c in chunks for k in c.keys] == read_imagenet_ab(folder, on_error="skip").keys
    parallel = list(iter_imagenet_ab_chunks(folder, on_error="skip", chunk_size=5, n_jobs=2))
    assert [c.keys for c in parallel] == [c.keys for c in chunks]
    assert [c.errors for c in parallel] == [c.errors for c in chunks]
    for a, b in zip((r for c in chunks for r in c), (r for c in parallel for r in c)):
        np.testing.assert_array_equal(a.point, b.point)
        assert [len(t.trace) for t in a.tasks] == [len(t.trace) for t in b.tasks]
    first_bad = min(paths.index(p) for p in truth.malformed)
    good_chunks = []
    with pytest.raises(ByproductFormatError):
        for chunk in iter_imagenet_ab_chunks(folder, chunk_size=5):
            good_chunks.append(chunk)
    assert len(good_chunks) == first_bad // 5
    with pytest.raises(ValueError, match="chunk_size"):
        next(iter_imagenet_ab_chunks(folder, chunk_size=2.5))


def test_duplicate_keys_in_a_path_list(imagenet_folder, tmp_path):
    _, truth = imagenet_folder
    good = [p for p in truth.paths if p not in truth.malformed]
    copy = tmp_path / os.path.basename(good[0])
    copy.write_bytes(open(good[0], "rb").read())
    records = read_imagenet_ab([good[0], good[0], str(copy), good[1]], on_error="skip")
    assert [r.path for r in records] == [good[0], good[1]]
    assert records.errors[0].path == str(copy) and "duplicate key" in records.errors[0].reason
    assert len(read_imagenet_ab(good[:2], [good[1], good[1]])) == 1


def test_unreadable_listed_file_is_reported(tmp_path):
    missing = str(tmp_path / "n1" / "n1_5.xml")
    records = read_imagenet_ab([missing], on_error="skip")
    assert len(records) == 0 and records.errors[0].path == missing
    assert "FileNotFoundError" in records.errors[0].reason


@pytest.mark.parametrize(
    ("xml", "match"),
    [
        ("<annotation><metadata><selected>Maybe</selected></metadata></annotation>", "not True/False"),
        ("<annotation><metadata><estimateTime>12ms</estimateTime></metadata></annotation>", "estimateTime"),
        (
            "<annotation><metadata><hit_submit_time>yesterday</hit_submit_time></metadata></annotation>",
            "neither epoch ms nor an ISO",
        ),
        ("<annotation><metadata>", "ParseError"),
    ],
)
def test_bad_xml_reasons(tmp_path, xml, match):
    path = tmp_path / "n1_1.xml"
    path.write_text(xml)
    with pytest.raises(ByproductFormatError, match=match):
        parse_imagenet_ab_xml(path)


def test_reader_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="on_error must be"):
        read_imagenet_ab(tmp_path, on_error="ignore")
    with pytest.raises(ValueError, match="source directory"):
        read_imagenet_ab(tmp_path / "nope")
    with pytest.raises(ValueError, match="source directory"):
        read_imagenet_ab(tmp_path / "nope", keys=["n1_1"])
    with pytest.raises(ValueError, match="chunk_size"):
        read_imagenet_ab(tmp_path, chunk_size=0)


def test_keys_and_records_collection():
    assert imagenet_key("n01440764_10026") == "n01440764/n01440764_10026"
    assert imagenet_key("/data/xml/n01440764/n01440764_10026.xml") == "n01440764/n01440764_10026"
    assert coco_key("17") == 17 and coco_key(np.int64(5)) == 5
    assert coco_key("val/COCO_train2014_000000000042.jpg") == 42
    with pytest.raises(ValueError, match="ImageNet key"):
        imagenet_key("nounderscore.JPEG")
    with pytest.raises(ValueError, match="COCO image_id"):
        coco_key("cat.jpg")
    with pytest.raises(ValueError, match="duplicate key"):
        ByproductRecords([ImageNetABRecord("n1/n1_1", "a"), ImageNetABRecord("n1/n1_1", "b")], "imagenet_ab")
    with pytest.raises(ValueError, match="fmt must be"):
        ByproductRecords([], fmt="voc")
    pair = [ImageNetABRecord("n1/n1_1", "a"), ImageNetABRecord("n1/n1_2", "b")]
    recs = ByproductRecords(pair, "imagenet_ab")
    assert recs.get("n1_2.JPEG").path == "b" and recs.get("n1_3") is None and len(recs[:1]) == 1
    assert "n_records=2" in repr(recs)


def test_to_dataframe_is_tidy(imagenet_folder, coco_file):
    pd = pytest.importorskip("pandas")
    records = read_imagenet_ab(imagenet_folder[0], on_error="skip")
    frame = records.to_dataframe()
    assert isinstance(frame, pd.DataFrame)
    assert len(frame) == sum(len(r.tasks) for r in records)
    assert {"key", "task", "selected", "point_x", "point_y", "estimate_time"} <= set(frame.columns)
    coco = read_coco_ab(coco_file[0], on_error="skip").to_dataframe()
    assert len(coco) == len(coco_file[1].image_ids) - len(coco_file[1].malformed)


# -- COCO-AB ------------------------------------------------------------------------------------------------


def test_coco_reader_keeps_good_records_and_reports_bad_ones(coco_file):
    path, truth = coco_file
    records = read_coco_ab(path, on_error="skip")
    good = [i for i in range(len(truth.image_ids)) if i not in truth.malformed]
    assert records.keys == [truth.image_ids[i] for i in good]
    assert len(records.errors) == len(truth.malformed)
    assert "missing field 'image_id'" in records.errors[0].reason and "[record 38]" in records.errors[0].path
    assert "truncated" in records.errors[-1].reason
    rec = records[0]
    assert rec.points_to.shape == (len(rec.action_types), 2) and rec.trace.shape[1] == 3
    assert set(rec.action_types) <= {"add", "move", "remove"} and set(rec.icon_types) <= set(truth.classes)
    assert rec.category_names and rec.time_spent > 0 and rec.image_size[0] > 0


def test_coco_stream_without_an_error_list_warns(coco_file):
    with pytest.warns(UserWarning) as caught:
        records = list(iter_coco_ab(coco_file[0], on_error="skip"))
    messages = [str(w.message) for w in caught]
    assert len(messages) == len(coco_file[1].malformed)
    assert "[record 38]: missing field" in messages[0] and "truncated" in messages[-1]
    assert len(records) == len(coco_file[1].image_ids) - len(coco_file[1].malformed)


def test_coco_reader_raises_on_request(coco_file):
    with pytest.raises(ByproductFormatError, match=r"\[record 38\]: missing field"):
        read_coco_ab(coco_file[0])


@pytest.mark.parametrize("chunk_chars", [1, 7, 4096])
def test_coco_stream_is_independent_of_chunking(coco_file, chunk_chars):
    path, _ = coco_file
    reference = read_coco_ab(path, on_error="skip")
    records = read_coco_ab(path, on_error="skip", chunk_chars=chunk_chars)
    assert records.keys == reference.keys and records.errors == reference.errors
    for a, b in zip(reference, records):
        np.testing.assert_array_equal(a.trace, b.trace)
        np.testing.assert_array_equal(a.points_to, b.points_to)


def test_coco_image_ids_filter_and_align(coco_file):
    path, truth = coco_file
    wanted = [truth.image_ids[5], 123456789, truth.image_ids[2]]
    records = read_coco_ab(path, wanted, on_error="skip")
    assert records.keys == [truth.image_ids[2], truth.image_ids[5]]
    assert [r is None for r in records.align(wanted)] == [False, True, False]
    assert records.get(f"COCO_train2014_{truth.image_ids[5]:012d}.jpg").image_id == truth.image_ids[5]


@pytest.mark.parametrize(
    ("text", "n_records", "match"),
    [
        ("[]", 0, None),
        ('  [ {"image_id": 1} ,\n {"image_id": 2} ]  ', 2, None),
        ("", 0, "empty file"),
        ('{"image_id": 1}', 0, "top level must be a JSON list"),
        ('[{"image_id": 1} {"image_id": 2}]', 1, "expected ',' or ']'"),
        ('[{"image_id": 1}, {"image_id": 1}]', 1, "duplicate image_id 1"),
        ('[{"image_id": 1}, 7, {"image_id": "x"}]', 1, "must be a JSON object"),
        ('[{"image_id": 1}, {"image_id": 2, "actionHistories": [{"pointTo": {}}]}]', 1, "missing field"),
        ('[{"image_id": 1}', 1, "file ends before the list is closed"),
    ],
)
def test_coco_json_edge_cases(tmp_path, text, n_records, match):
    path = tmp_path / "ab.json"
    path.write_text(text)
    records = read_coco_ab(path, on_error="skip")
    assert len(records) == n_records
    if match is None:
        assert records.errors == []
    else:
        assert match in " ".join(e.reason for e in records.errors)
        with pytest.raises(ByproductFormatError):
            read_coco_ab(path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(json_values, max_size=5), st.integers(1, 40), st.sampled_from([None, 0, 3]))
def test_json_list_stream_matches_json_loads(items, chunk_chars, indent):
    text = json.dumps(items, indent=indent, ensure_ascii=False)
    got = list(_iter_json_list(io.StringIO(text), chunk_chars, max_item_chars=10**6))
    assert [v for _, _, v in got] == items
    assert [i for i, _, _ in got] == list(range(len(items)))
    for _, offset, value in got:  # offsets point at each record in the text
        assert json.JSONDecoder().raw_decode(text, offset)[0] == value


@pytest.mark.parametrize("text", ["[12345, 678]", "[0.0]", "[1e-3,2E+5,-0.5]", "[0 ,1]", '[true, null, "x"]'])
@pytest.mark.parametrize("chunk_chars", [1, 2, 3])
def test_json_list_stream_does_not_split_numbers(text, chunk_chars):
    items = list(_iter_json_list(io.StringIO(text), chunk_chars, max_item_chars=100))
    assert [v for _, _, v in items] == json.loads(text)


def test_coco_argument_errors(coco_file, tmp_path):
    with pytest.raises(ValueError, match="on_error must be"):
        read_coco_ab(coco_file[0], on_error="warn")
    with pytest.raises(ValueError, match="chunk_chars"):
        read_coco_ab(coco_file[0], chunk_chars=0)
    with pytest.raises(FileNotFoundError):
        read_coco_ab(tmp_path / "missing.json")


def test_coco_stream_memory_is_bounded(tmp_path):
    path = tmp_path / "big.json"
    make_coco_ab_like(path, n_images=400, random_state=1)
    size = os.path.getsize(path)
    tracemalloc.start()
    try:
        n = sum(1 for _ in iter_coco_ab(path, traces=False, chunk_chars=1 << 14))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 400
    assert peak < size / 4, (peak, size)


# -- generators ---------------------------------------------------------------------------------------------


def test_imagenet_generator_uses_given_images(tmp_path):
    images = [("n1", 1, (100, 80), (0.25, 0.75), (10, 20, 50, 70)), ("n1", 2, (60, 60), None)]
    truth = make_imagenet_ab_like(tmp_path, images, click_noise=0.0, apple_double=False, random_state=0)
    assert truth.image_keys == ["n1/n1_1", "n1/n1_2"] and truth.junk == []
    np.testing.assert_allclose(truth.points[0], [0.25, 0.75])
    assert np.isnan(truth.points[1]).all() and np.isnan(truth.true_points[1]).all()
    records = read_imagenet_ab(tmp_path)
    assert not any(t.selected for t in records.get("n1_2").tasks)
    np.testing.assert_array_equal(records.get("n1_1").ilsvrc_boxes, [[10, 20, 50, 70]])
    np.testing.assert_array_equal(truth.image_sizes, [[100, 80], [60, 60]])


def test_generators_are_deterministic(tmp_path):
    a = make_coco_ab_like(tmp_path / "a.json", n_images=5, random_state=3)
    b = make_coco_ab_like(tmp_path / "b.json", n_images=5, random_state=3)
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    np.testing.assert_array_equal(a.add_points, b.add_points)
    t1 = make_imagenet_ab_like(tmp_path / "x", n_classes=1, n_per_class=3, random_state=4)
    t2 = make_imagenet_ab_like(tmp_path / "y", n_classes=1, n_per_class=3, random_state=4)
    assert [open(p).read() for p in t1.paths] == [open(p).read() for p in t2.paths]


def test_coco_generator_given_images_and_instances(tmp_path):
    images = [(7, (640, 480), {"dog": [(0.2, 0.2), (0.8, 0.8)], "cat": (0.5, 0.5)}), (9, (300, 300), {})]
    truth = make_coco_ab_like(
        tmp_path / "c.json", images, classes=["cat", "dog", "cow"], p_move=0.0, p_remove=0.0, random_state=0
    )
    np.testing.assert_allclose(truth.true_points[0], [0.5, 0.5, 0.5, 0.5, np.nan, np.nan])
    assert np.isnan(truth.add_points[1]).all()
    record = json.loads((tmp_path / "c.json").read_text())[0]
    assert [a["iconType"] for a in record["actionHistories"]].count("dog") == 2


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda p: make_imagenet_ab_like(p, [("n1", 1, (5, 5))]), r"images\[0\] must be a tuple of 4 or 5"),
        (lambda p: make_imagenet_ab_like(p, n_classes=1, n_per_class=1, n_malformed=2), "n_malformed must"),
        (lambda p: make_imagenet_ab_like(p, max_tasks=0), "max_tasks"),
        (
            lambda p: make_coco_ab_like(p / "c.json", [(1, (5, 5), {"yak": (0.5, 0.5)})], classes=["dog"]),
            "not in classes",
        ),
        (lambda p: make_coco_ab_like(p / "c.json", [(1, (5, 5))]), r"images\[0\] must be a tuple of 3"),
        (lambda p: make_coco_ab_like(p / "c.json", n_images=2, n_malformed=3), "n_malformed must"),
    ],
)
def test_generator_argument_errors(tmp_path, call, match):
    with pytest.raises(ValueError, match=match):
        call(tmp_path)


def test_n_jobs_none_follows_joblib_parallel_config(tmp_path, monkeypatch):
    import joblib

    from luab_sk.byproducts import imagenet_ab

    make_imagenet_ab_like(tmp_path, n_classes=2, n_per_class=4, random_state=0)
    expected = read_imagenet_ab(tmp_path, chunk_size=2)
    calls = []
    original = imagenet_ab._parse_in_parallel
    monkeypatch.setattr(
        imagenet_ab, "_parse_in_parallel", lambda *a: calls.append(a[-1]) or original(*a)
    )
    with joblib.parallel_config(backend="threading", n_jobs=2):
        got = read_imagenet_ab(tmp_path, chunk_size=2)
    assert calls == [None]  # parsed in parallel without an explicit n_jobs
    assert [r.key for r in got] == [r.key for r in expected]
    read_imagenet_ab(tmp_path, chunk_size=2)
    assert calls == [None]  # outside parallel_config: sequential
