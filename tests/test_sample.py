"""portrait.sample and portrait.shardio: the one definition of a shard sample and its tar."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from portrait import sample, shardio
from portrait.ids import image_id


def jpeg(colour) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(out, format="JPEG")
    return out.getvalue()


def meta(key: str, **changes) -> dict:
    points = [[float(i), float(i + 1)] for i in range(68)]
    base = {
        "image_id": key, "identity_id": "id-1", "box": [1.0, 2.0, 20.0, 22.0],
        "landmarks5": points[:5], "landmarks68": points, "width": 32, "height": 24,
        "source_width": 64, "source_height": 48, "caption": "a photo",
    }  # fmt: skip
    return {**base, **changes}


def test_encode_then_parse_gives_the_content_back():
    key = image_id("src", "a/b.jpg")
    members = sample.encode(key, jpeg("red"), jpeg("blue"), meta(key), np.ones(8) / np.sqrt(8))
    assert list(members) == list(sample.MEMBERS)
    parsed = sample.parse(key, members)
    assert parsed.identity_id == "id-1" and parsed.image == members["jpg"] and parsed.face == members["face.jpg"]
    assert parsed.embedding.dtype == np.float32 and parsed.landmarks.shape == (68, 2)
    assert json.loads(members["json"])["label"] is None  # every field is written
    five = sample.encode(key, jpeg("red"), jpeg("blue"), meta(key, landmarks68=None), np.ones(8))
    assert sample.parse(key, five).landmarks.shape == (5, 2)  # landmarks.npy follows the JSON


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(identity_id=None), "lacks identity_id"),
        (dict(box=[1, 2, 3]), "box must be 4"),
        (dict(width=0), "width must be a positive integer"),
        (dict(image_id="other"), "not its key"),
        (dict(colour="red"), "unknown JSON field"),
    ],
)
def test_encode_refuses_what_the_reader_would_skip(change, words):
    key = image_id("src", "x.jpg")
    with pytest.raises(ValueError, match=words):
        sample.encode(key, jpeg("red"), jpeg("blue"), meta(key, **change), np.ones(8))


def test_validate_names_each_problem_and_leaves_absent_members_to_the_caller():
    key = image_id("src", "y.jpg")
    members = sample.encode(key, jpeg("red"), jpeg("blue"), meta(key), np.ones(8))
    assert sample.validate(key, members) == []
    assert "missing member(s) embedding.npy" in sample.validate(key, {**members, "embedding.npy": None})[0]
    assert sample.validate(key, {**members, "embedding.npy": None}, check_members=False) == []
    assert "not a JPEG" in sample.validate(key, {**members, "face.jpg": b"GIF89a"})[0]
    bad = sample.npy_bytes(np.zeros((5, 2), np.float32))
    assert "has 5 points, its JSON 68" in sample.validate(key, {**members, "landmarks.npy": bad})[0]


def test_tars_are_byte_identical_and_read_back_by_sample():
    samples = [(k, sample.encode(k, jpeg("red"), jpeg("blue"), meta(k), np.ones(4))) for k in ("a1", "b2")]
    blobs = []
    for _ in range(2):
        buffer = io.BytesIO()
        with shardio.TarWriter(buffer) as tar:
            for key, members in samples:
                tar.write_sample(key, members)
        blobs.append(buffer.getvalue())
    assert blobs[0] == blobs[1] and len(blobs[0]) == shardio.tar_size(sum(shardio.member_tar_bytes(w.bytes) for w in tar.written))
    read = list(shardio.read_samples(shardio.read_members(io.BytesIO(blobs[0]))))
    assert [(k, m) for k, m in read] == samples
    with pytest.raises(ValueError, match="leave"):
        shardio.member_header("../a1.jpg", 1)
