import json

import numpy as np
import pyarrow.compute as pc
import pytest

from fkd_core.parquet_io import EXAMPLES_SCHEMA, dataset, read_examples
from fkd_flows.ingest import IngestConfig, ingest

pytestmark = pytest.mark.flows


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, sample_dir, sample_csv):
    out = tmp_path_factory.mktemp("ingest")
    report = ingest(csv=str(sample_csv), images=str(sample_dir / "images"), out=str(out), shard_size=16)
    return out, report


def test_ingest_writes_the_examples_contract(ingested):
    out, report = ingested
    ds = dataset(str(out / "examples"))
    assert ds.schema.equals(EXAMPLES_SCHEMA)
    tbl = ds.to_table()
    assert tbl.num_rows == report["rows_kept"] == 60 and report["rows_refused"] == 0
    assert report["boxes_from_haar"] + report["boxes_from_keypoints"] == 60
    assert report["boxes_from_haar"] >= 55  # the cascade finds nearly every face of this data set
    assert set(tbl.column("box_source").to_pylist()) <= {"haar", "keypoints"}
    assert all(len(c) == 144 * 144 for c in tbl.column("crop").to_pylist())
    assert json.loads((out / "ingest_report.json").read_text())["rows_kept"] == 60


def test_splits_are_grouped_by_person(ingested):
    out, _ = ingested
    tbl = dataset(str(out / "examples")).to_table(columns=["person", "split"])
    persons = {}
    for p, s in zip(tbl.column("person").to_pylist(), tbl.column("split").to_pylist(), strict=True):
        persons.setdefault(p, set()).add(s)
    assert all(len(s) == 1 for s in persons.values())
    assert pc.sum(pc.equal(tbl.column("split"), "val")).as_py() > 0


def test_crops_hold_the_face_where_the_keypoints_say(ingested):
    out, _ = ingested
    crops, kp, _ = read_examples(str(out / "examples"))
    # keypoints sit well inside the canonical crop, roughly centred (the crop is built around the face box)
    centre = kp.mean(axis=1).mean(axis=0)
    assert np.all(np.abs(centre - 71.5) < 12)
    assert kp.min() > 0 and kp.max() < 144
    # and the face region is brighter-textured than the zero padding: crops are real pixels
    assert crops.mean() > 40


def test_bad_rows_and_missing_images_are_refused_with_reasons(tmp_path, sample_dir, sample_csv):
    lines = sample_csv.read_text().splitlines()
    header, first, second = lines[0], lines[1], lines[2]
    vals = first.split(",")
    far = ",".join([vals[0], *vals[1:-1], "9999"])
    not_a_number = ",".join([*vals[:5], "abc", *vals[6:]])  # column 5 (the third point's x) is not a number
    lines_out = [
        header,
        first,
        ",".join(second.split(",")[:-2]),
        "missing_person_00.jpg," + ",".join(vals[1:]),
        far,
        not_a_number,
    ]
    csv = tmp_path / "bad.csv"
    csv.write_text("\n".join(lines_out) + "\n")
    report = ingest(csv=str(csv), images=str(sample_dir / "images"), out=str(tmp_path / "out"))
    assert report["rows_kept"] == 1
    refused = "\n".join(report["refused"])
    assert "bad.csv row 3: 135 columns, expected 137" in refused
    assert "bad.csv row 4 (missing_person_00.jpg): not found" in refused
    assert "bad.csv row 5" in refused and "far outside" in refused
    assert "bad.csv row 6: column 5 is not a number: 'abc'" in refused
    assert report["rows_refused"] == 4


def test_bad_config_is_refused_naming_the_field():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="split_by"):
        IngestConfig(csv="a.csv", images="i", out="o", split_by="random")
    with pytest.raises(ValidationError, match="shard_sise"):
        IngestConfig(csv="a.csv", images="i", out="o", shard_sise=3)
