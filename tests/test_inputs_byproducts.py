"""Byproduct readers on hostile inputs: per-item failures are skipped and listed; numbers are strict."""

import json
import math
import os

import numpy as np
import pytest

from luab_sk.byproducts import (
    ByproductEncoder,
    ByproductFormatError,
    parse_imagenet_ab_xml,
    read_coco_ab,
    read_imagenet_ab,
)
from luab_sk.byproducts import imagenet_ab as imagenet_ab_module
from luab_sk.byproducts._records import ImpossibleValue, strict_number
from luab_sk.datasets.imagenet_ab_like import make_coco_ab_like, make_imagenet_ab_like

# One ImageNet-AB file with every numeric field; {name} placeholders take the values under test.
TEMPLATE = """<annotation>
  <size><width>{size_width}</width><height>300</height></size>
  <object><name>n1</name><bndbox><xmin>{bndbox_xmin}</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>
  <metadata>
    <selected>True</selected>
    <selectedRecord><x>{x}</x><y>{y}</y><time>{click_time}</time></selectedRecord>
    <selectedCount>{selected_count}</selectedCount>
    <mouseTracking><time>{trace_time}</time><x>{trace_x}</x><y>0.5</y></mouseTracking>
    <mouseTracking><time>1633000000950</time><x>0.3</x><y>0.45</y></mouseTracking>
    <hoveredRecord><action>enter</action><time>{hover_time}</time></hoveredRecord>
    <hoveredRecord><action>leave</action><time>1633000000400</time></hoveredRecord>
    <hoveredCount>{hovered_count}</hoveredCount>
    <estimateTime>{estimate_time}</estimateTime>
    <imageWidth>{image_width}</imageWidth><imageHeight>150</imageHeight>
    <originalImageWidth>400</originalImageWidth><originalImageHeight>{original_height}</originalImageHeight>
    <imagePosition><x>{position_x}</x><y>40</y></imagePosition>
    <image_idx>{image_idx}</image_idx><page_idx>{page_idx}</page_idx>
    <hit_submit_time>{submit}</hit_submit_time>
  </metadata>
</annotation>
"""
GOOD = {
    "size_width": "400", "bndbox_xmin": "1", "x": "0.25", "y": "0.5", "click_time": "1633000001000",
    "selected_count": "1", "trace_time": "1633000000900", "trace_x": "0.5", "hover_time": "1633000000000",
    "hovered_count": "1", "estimate_time": "850", "image_width": "200", "original_height": "300",
    "position_x": "30", "image_idx": "47", "page_idx": "9", "submit": "1633000090000",
}  # fmt: skip


def _write(folder, name="n1_1.xml", **values):
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(TEMPLATE.format(**{**GOOD, **values}))
    return path


def test_template_is_clean(tmp_path):
    errors = []
    rec = parse_imagenet_ab_xml(_write(tmp_path), on_error="skip", errors=errors)
    assert errors == [] and rec.point.tolist() == [0.25, 0.5]


# -- 8: stray files and any per-file failure ----------------------------------------------------------------


def test_stray_xml_files_are_skipped_and_listed(tmp_path):
    truth = make_imagenet_ab_like(tmp_path, n_classes=2, n_per_class=3, random_state=0)
    wnid_dir = os.path.dirname(truth.paths[0])
    strays = [
        str(tmp_path / "README.xml"),
        os.path.join(wnid_dir, "_x.xml"),
        os.path.join(wnid_dir, "a_b_c.xml"),
    ]
    for path in strays:
        with open(path, "w") as f:
            f.write("<readme>not an annotation</readme>")
    not_annotation = _write(wnid_dir, "n9_9.xml")
    with open(not_annotation, "w") as f:
        f.write("<html><body>a web page saved as xml</body></html>")
    records = read_imagenet_ab(tmp_path, on_error="skip")
    assert len(records) == len(truth.paths)
    listed = {e.path: e.reason for e in records.errors}
    assert set(listed) == {*strays, not_annotation}
    assert all("not <wnid>_<id>.xml" in listed[p] for p in strays)
    assert "not <annotation>" in listed[not_annotation]
    with pytest.raises(ByproductFormatError) as info:
        read_imagenet_ab(tmp_path)
    assert info.value.path in listed and info.value.path in str(info.value)
    # A list of paths, and keys, behave the same.
    from_list = read_imagenet_ab([*truth.paths, *strays], on_error="skip")
    assert len(from_list) == len(truth.paths) and {e.path for e in from_list.errors} == set(strays)
    assert len(read_imagenet_ab([*truth.paths, *strays], truth.image_keys)) == len(truth.paths)
    with pytest.raises(ByproductFormatError, match="README.xml"):
        parse_imagenet_ab_xml(strays[0])


@pytest.mark.parametrize(
    "error", [RecursionError("maximum recursion depth exceeded"), MemoryError(), AttributeError("x")]
)
def test_any_exception_on_one_file_is_that_files_error(tmp_path, monkeypatch, error):
    good, bad = _write(tmp_path, "n1_1.xml"), _write(tmp_path, "n1_2.xml", estimate_time="851")
    real = imagenet_ab_module._parse_task

    def parse_task(block, traces, problems):
        if block.findtext("estimateTime") == "851":
            raise error
        return real(block, traces, problems)

    monkeypatch.setattr(imagenet_ab_module, "_parse_task", parse_task)
    records = read_imagenet_ab([good, bad], on_error="skip")
    assert [r.path for r in records] == [good]
    assert records.errors[0].path == bad and type(error).__name__ in records.errors[0].reason
    with pytest.raises(ByproductFormatError) as info:
        read_imagenet_ab([good, bad])
    assert info.value.path == bad


def test_deeply_nested_and_undecodable_xml_is_one_files_error(tmp_path):
    deep = tmp_path / "n1_1.xml"
    deep.write_text("<annotation><metadata>" + "<a>" * 50_000 + "</a>" * 50_000 + "</metadata></annotation>")
    latin = tmp_path / "n1_2.xml"
    latin.write_bytes(b'<?xml version="1.0" encoding="utf-8"?><annotation><x>\xff\xfe</x></annotation>')
    bomb = tmp_path / "n1_3.xml"
    bomb.write_text(
        '<!DOCTYPE a [<!ENTITY b "bb"><!ENTITY c "&b;&b;">]><annotation><metadata>&c;</metadata></annotation>'
    )
    good = _write(tmp_path, "n1_4.xml")
    records = read_imagenet_ab(tmp_path, on_error="skip")
    assert good in [r.path for r in records]
    assert {str(latin), str(bomb)} <= {e.path for e in records.errors}
    assert len(records) + len(records.errors) == 4


# -- 10: strict numbers, ImageNet-AB ------------------------------------------------------------------------

IMPOSSIBLE = ["inf", "-inf", "Infinity", "nan", "NaN", "1e999"]


@pytest.mark.parametrize("value", [*IMPOSSIBLE, "1.7", "-0.1", "1.0000001"])
def test_impossible_click_is_missing_and_listed(tmp_path, value):
    path = _write(tmp_path, x=value)
    errors = []
    rec = parse_imagenet_ab_xml(path, on_error="skip", errors=errors)
    assert np.isnan(rec.tasks[0].point).all() and np.isnan(rec.point).all()
    assert errors[0].path == path and "<selectedRecord/x>" in errors[0].reason
    records = read_imagenet_ab([path], on_error="skip")
    assert (
        len(records) == 1
        and records.errors[0].path == path
        and "selectedRecord/x" in records.errors[0].reason
    )
    with pytest.raises(ByproductFormatError, match=r"n1_1\.xml.*selectedRecord/x"):
        read_imagenet_ab([path])
    with pytest.warns(UserWarning, match="selectedRecord/x"):
        parse_imagenet_ab_xml(path, on_error="skip")
    Z = ByproductEncoder(kind=["point", "heatmap", "trace", "timing"]).fit(records).transform(records)
    assert not np.isinf(Z).any() and np.isnan(Z[0, :2]).all()


@pytest.mark.parametrize("value", ["0_5", "0x1", "five", "1,5", "٠.5", "0.5.1"])
def test_malformed_numbers_make_the_file_malformed(tmp_path, value):
    path = _write(tmp_path, x=value)
    records = read_imagenet_ab([path], on_error="skip")
    assert len(records) == 0 and "not a number" in records.errors[0].reason
    assert "selectedRecord/x" in records.errors[0].reason


@pytest.mark.parametrize(
    ("field", "value", "tag", "attribute"),
    [
        ("y", "2", "selectedRecord/y", lambda r: r.tasks[0].point),
        ("click_time", "-5", "selectedRecord/time", lambda r: r.tasks[0].selected_time),
        ("selected_count", "-1", "selectedCount", lambda r: r.tasks[0].selected_count),
        ("trace_time", "inf", "mouseTracking/time", lambda r: r.tasks[0].trace[0, 0]),
        ("trace_x", "1.5", "mouseTracking/x", lambda r: r.tasks[0].trace[0, 1:]),
        ("hover_time", "nan", "hoveredRecord/time", lambda r: r.tasks[0].hover_times[0]),
        ("hovered_count", "-2", "hoveredCount", lambda r: r.tasks[0].hovered_count),
        ("estimate_time", "1e999", "estimateTime", lambda r: r.tasks[0].estimate_time),
        ("image_width", "0", "imageWidth", lambda r: r.tasks[0].image_size[0]),
        ("original_height", "-300", "originalImageHeight", lambda r: r.tasks[0].original_image_size[1]),
        ("position_x", "inf", "imagePosition/x", lambda r: r.tasks[0].image_position),
        ("image_idx", "-1", "image_idx", lambda r: r.tasks[0].image_idx),
        ("page_idx", "NaN", "page_idx", lambda r: r.tasks[0].page_idx),
        ("submit", "-1e3", "hit_submit_time", lambda r: r.tasks[0].hit_submit_time),
        ("submit", "1900-01-01T00:00:00Z", "hit_submit_time", lambda r: r.tasks[0].hit_submit_time),
        ("size_width", "0", "size/width", lambda r: r.size[0]),
        ("bndbox_xmin", "inf", "bndbox/xmin", lambda r: r.ilsvrc_boxes[0, 0]),
    ],
)
def test_every_imagenet_number_is_checked(tmp_path, field, value, tag, attribute):
    errors = []
    rec = parse_imagenet_ab_xml(_write(tmp_path, **{field: value}), on_error="skip", errors=errors)
    assert np.isnan(attribute(rec)).all()
    assert len(errors) == 1 and f"<{tag}>" in errors[0].reason
    with pytest.raises(ByproductFormatError, match=tag):
        parse_imagenet_ab_xml(_write(tmp_path, **{field: value}))


def test_strict_number():
    assert strict_number("1e3") == 1000.0 and strict_number(" .5 ", "unit") == 0.5 and strict_number(7) == 7.0
    for text in ("0_5", "1__0", "0x10", "", "1 0", True, None, [1]):
        with pytest.raises(ValueError) as info:
            strict_number(text)
        assert not isinstance(info.value, ImpossibleValue)
    for value, domain in [("inf", "finite"), (math.nan, "finite"), (10**400, "finite"), (0, "positive"),
                          (-1e-9, "nonnegative"), (1.5, "unit")]:  # fmt: skip
        with pytest.raises(ImpossibleValue):
            strict_number(value, domain)


# -- 10: strict numbers, COCO-AB ----------------------------------------------------------------------------


def _coco_record(image_id=1, changes=()):
    record = {
        "image_id": image_id, "originalImageWidth": 640, "originalImageHeight": 480, "imageWidth": 480,
        "imageHeight": 360, "timeSpent": 5000, "worker_id": "W1", "hit_id": "H1", "page_id": 3,
        "actionHistories": [
            {"actionType": "add", "iconType": "dog", "pointFrom": None, "pointTo": {"x": 0.4, "y": 0.5},
             "timeAt": 100},
            {"actionType": "move", "iconType": "dog", "pointFrom": {"x": 0.4, "y": 0.5},
             "pointTo": {"x": 0.45, "y": 0.5}, "timeAt": 200},
        ],
        "categoryHistories": [
            {"categoryIndex": 2, "categoryName": "dog", "timeAt": 50, "usingKeyboard": False}
        ],
        "mouseTracking": [{"x": 0.1, "y": 0.2, "timeAt": 10}, {"x": 0.4, "y": 0.5, "timeAt": 90}],
    }  # fmt: skip
    record.update(changes)
    return record


def _coco_file(tmp_path, records, raw=None):
    path = tmp_path / "ab.json"
    text = json.dumps(records)
    for old, new in (raw or {}).items():
        assert old in text
        text = text.replace(old, new)
    path.write_text(text)
    return path


@pytest.mark.parametrize("constant", ["Infinity", "-Infinity", "NaN", "1e999", "-5"])
def test_coco_impossible_time_spent_names_the_record_and_field(tmp_path, constant):
    path = _coco_file(tmp_path, [_coco_record(1), _coco_record(2, {"timeSpent": 12345})], {"12345": constant})
    records = read_coco_ab(path, on_error="skip")
    assert records.keys == [1, 2] and np.isnan(records[1].time_spent) and records[0].time_spent == 5000
    assert len(records.errors) == 1
    assert "[record 1]" in records.errors[0].path and "timeSpent" in records.errors[0].reason
    with pytest.raises(ByproductFormatError, match=r"\[record 1\].*timeSpent"):
        read_coco_ab(path)
    # The encoder's robust scaler sees a missing timing, not an infinity.
    Z = ByproductEncoder(kind="timing").fit(records).transform(records)
    assert np.isnan(Z[1, 0]) and np.isfinite(Z[0]).all()


@pytest.mark.parametrize(
    ("raw", "field", "check"),
    [
        ({"0.45": "1.7"}, "actionHistories[1].pointTo.x", lambda r: r.points_to[1]),
        ({"0.45": "Infinity"}, "actionHistories[1].pointTo.x", lambda r: r.points_to[1]),
        ({'"timeAt": 100': '"timeAt": -1'}, "actionHistories[0].timeAt", lambda r: r.action_times[0]),
        ({'"categoryIndex": 2': '"categoryIndex": NaN'}, "categoryHistories[0].categoryIndex",
         lambda r: r.category_indices[0]),
        ({'"timeAt": 50': '"timeAt": 1e999'}, "categoryHistories[0].timeAt", lambda r: r.category_times[0]),
        ({'"x": 0.1': '"x": -0.1'}, "mouseTracking[0].x", lambda r: r.trace[0, 1:]),
        ({'"timeAt": 10}': '"timeAt": Infinity}'}, "mouseTracking[0].timeAt", lambda r: r.trace[0, 0]),
        ({'"imageWidth": 480': '"imageWidth": 0'}, "imageWidth", lambda r: r.image_size[0]),
        ({'"originalImageHeight": 480': '"originalImageHeight": -1'}, "originalImageHeight",
         lambda r: r.original_image_size[1]),
        ({'"page_id": 3': '"page_id": NaN'}, "page_id", lambda r: r.page_id),
    ],
)  # fmt: skip
def test_every_coco_number_is_checked(tmp_path, raw, field, check):
    path = _coco_file(tmp_path, [_coco_record(1)], raw)
    records = read_coco_ab(path, on_error="skip")
    assert len(records) == 1 and np.isnan(check(records[0])).all()
    assert len(records.errors) == 1 and field in records.errors[0].reason
    with pytest.raises(ByproductFormatError, match=field.replace("[", r"\[").replace("]", r"\]")):
        read_coco_ab(path)


def test_coco_impossible_click_is_missing_for_the_encoder(tmp_path):
    path = _coco_file(tmp_path, [_coco_record(1), _coco_record(2)], {"0.45": "1.7"})
    text = path.read_text().replace("1.7", "0.45", 1)  # only record 1's move goes off the image
    path.write_text(text)
    records = read_coco_ab(path, on_error="skip")
    enc = ByproductEncoder(kind=["points_per_class", "heatmap"], per_class_position="final", classes=["dog"])
    enc.fit(records)
    Z = enc.transform(records)
    assert np.isfinite(Z).all()  # the off-image move is ignored: the icon stays where it was added
    np.testing.assert_allclose(Z[:, :2], [[0.45, 0.5], [0.4, 0.5]])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"timeSpent": "0_5"}, "timeSpent holds '0_5', not a number"),
        ({"timeSpent": True}, "timeSpent holds True"),
        ({"actionHistories": ["add"]}, "actionHistories[0] must be an object"),
        ({"actionHistories": {"a": 1}}, "actionHistories must be a list"),
        ({"mouseTracking": [[0.1, 0.2]]}, "mouseTracking[0] must be an object"),
        ({"categoryHistories": [{"usingKeyboard": "yes"}]}, "usingKeyboard"),
        ({"image_id": True}, "not a COCO image id"),
        ({"image_id": 1.5}, "not a COCO image id"),
        ({"actionHistories": [{"actionType": 3, "iconType": "dog", "pointTo": None}]}, "actionType"),
        ({"actionHistories": [{"actionType": "add", "iconType": {"a": 1}, "pointTo": None}]}, "iconType"),
    ],
)
def test_malformed_coco_fields_skip_the_record(tmp_path, change, match):
    path = _coco_file(tmp_path, [_coco_record(7), _coco_record(1, change)])
    records = read_coco_ab(path, on_error="skip")
    assert (
        records.keys == [7] and match in records.errors[0].reason and "[record 1]" in records.errors[0].path
    )
    with pytest.raises(ByproductFormatError, match=r"\[record 1\]"):
        read_coco_ab(path)


def test_coco_strings_holding_decimals_and_constants_in_extra(tmp_path):
    path = _coco_file(
        tmp_path, [_coco_record(1, {"timeSpent": "5000", "custom": {"a": [1, 12345]}})], {"12345": "NaN"}
    )
    records = read_coco_ab(path, on_error="skip")
    assert records[0].time_spent == 5000 and records[0].extra == {"custom": {"a": [1, None]}}
    assert "custom holds NaN" in records.errors[0].reason


@pytest.mark.parametrize("chunk_chars", [64, 1 << 20])
def test_deeply_nested_coco_record_is_skipped(tmp_path, chunk_chars):
    deep = '{"image_id": 2, "x": ' + "[" * 100_000 + '"]}[{"' + "]" * 100_000 + "}"
    path = tmp_path / "ab.json"
    path.write_text(
        "[" + json.dumps(_coco_record(1)) + ", " + deep + ", " + json.dumps(_coco_record(3)) + "]"
    )
    records = read_coco_ab(path, on_error="skip", chunk_chars=chunk_chars)
    assert records.keys == [1, 3]
    assert "[record 1]" in records.errors[0].path and "RecursionError" in records.errors[0].reason
    with pytest.raises(ByproductFormatError, match=r"\[record 1\].*nested too deeply"):
        read_coco_ab(path, chunk_chars=chunk_chars)


def test_generated_files_stay_clean(tmp_path):
    truth = make_coco_ab_like(tmp_path / "c.json", n_images=10, random_state=0)
    assert read_coco_ab(truth.path).errors == []
    folder = make_imagenet_ab_like(tmp_path / "i", n_classes=2, n_per_class=5, random_state=0)
    assert read_imagenet_ab(tmp_path / "i").errors == [] and len(folder.paths) == 10
