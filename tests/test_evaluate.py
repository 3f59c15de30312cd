"""trainer.evaluate: scorers on real fixture photos (head pose, expression, the calibration of
face similarity: same person above other people), the images mode with a missing and a faceless
output counted, the default protocol on the demo's held-out identities with a tiny checkpoint,
and the report page in headless Chromium."""

from __future__ import annotations

import asyncio
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from audit_browser import CHROMIUM, Browser
from PIL import Image

from trainer.evaluate import main

REPO = Path(__file__).resolve().parent.parent
IDENTITIES = ["Colin_Powell", "George_W_Bush", "Tony_Blair"]
TURNED = "Keanu_Reeves/Keanu_Reeves_0004.png"  # yaw about 25 degrees


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def cases(folder: Path) -> list[dict]:
    with open(folder / "cases.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP saved like a real local one (model, tokenizer, image processor)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from trainer.architectures import tiny_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def protocol_file(faces_dir, clip_dir, tmp_path_factory) -> Path:
    from onnx_models import write_recognizer

    folder = tmp_path_factory.mktemp("protocol")
    arcface = write_recognizer(folder / "models" / "w600k_r50.onnx")
    protocol = {
        "name": "fixtures",
        "identities": {"folder": str(faces_dir / "dev"), "names": IDENTITIES},
        "references": 2,
        "prompts": ["a photo of a person", "a photo of a person in a park"],
        "driving": [str(faces_dir / "dev" / TURNED)],
        "seeds": [0, 1],
        "scorers": {
            "recognition": [{"name": "dlib", "kind": "dlib"}, {"name": "arcface", "kind": "arcface", "model": "models/w600k_r50.onnx"}],
            "clip": str(clip_dir),
            "bootstrap": 500,
        },
    }
    path = folder / "protocol.yaml"
    path.write_text(yaml.safe_dump(protocol))
    return path


@pytest.fixture(scope="module")
def calibrated(protocol_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibration")
    return out, main(["--protocol", str(protocol_file), "--calibrate", "--out", str(out)])


def test_pose_error_is_zero_against_itself_and_large_against_the_mirror(faces_dir):
    from portrait.faces.reader import FaceReader, load_photo
    from trainer.scoring import headpose

    reader = FaceReader()

    def landmarks(rgb):
        return reader.read(rgb).landmarks68, rgb.shape[1], rgb.shape[0]

    photo = load_photo((faces_dir / "dev" / TURNED).read_bytes())
    pose = headpose.head_pose(*landmarks(photo))
    mirror = headpose.head_pose(*landmarks(np.ascontiguousarray(photo[:, ::-1])))
    assert headpose.pose_error(pose, pose)["mean"] == 0.0
    assert abs(pose["yaw"]) > 15 and np.sign(pose["yaw"]) == -np.sign(mirror["yaw"])
    assert headpose.pose_error(mirror, pose)["yaw"] > 30
    # expression with pose factored out: a photo and its mirror (pose changed) differ far less
    # than an open smile and a closed mouth
    expression = headpose.expression(*landmarks(photo))
    mirrored = headpose.expression(*landmarks(np.ascontiguousarray(photo[:, ::-1])))
    smile = headpose.expression(*landmarks(load_photo((faces_dir / "dev/Jennifer_Capriati/Jennifer_Capriati_0009.jpg").read_bytes())))
    closed = headpose.expression(*landmarks(load_photo((faces_dir / "dev/Ben_Affleck/Ben_Affleck_0011.jpg").read_bytes())))
    assert smile["mouth_open"] > 0.2 > 0.05 > closed["mouth_open"]
    assert headpose.expression_error(mirrored, expression) < headpose.expression_error(smile, closed) / 2


def test_calibration_separates_the_same_person_from_other_people(calibrated, protocol_file):
    out, result = calibrated
    table = json.loads((out / "calibration.json").read_text())["metrics"]
    dlib = table["face_similarity/dlib"]
    assert dlib["same"]["n"] == dlib["other"]["n"] == 12
    assert dlib["same"]["mean"] > dlib["other"]["mean"] + 0.05
    assert dlib["same"]["ci95"][0] > dlib["other"]["ci95"][1]  # the intervals do not overlap
    assert dlib["auc_same_over_other"] >= 0.9
    # the same photos serve as "other" outputs, moved to the wrong identity: pose and prompt
    # scores cannot tell the two apart, only identity can
    assert table["pose_error"]["same"]["mean"] == pytest.approx(table["pose_error"]["other"]["mean"])
    summary = json.loads((out / "calibration" / "same" / "summary.json").read_text())
    arcface = summary["metrics"]["face_similarity/arcface"]
    from trainer.scoring.recognition import sha256_file

    assert arcface["model_sha256"] == sha256_file(protocol_file.parent / "models" / "w600k_r50.onnx")
    assert arcface["n"] == 12 and arcface["conditions_generator"] is None  # real photos: no generator
    assert summary["metrics"]["clip_t"]["n"] == 12 and -1 <= summary["metrics"]["clip_i"]["mean"] <= 1
    assert summary["detection"]["misses"] == 0 and summary["statuses"] == {"scored": 12}
    rows = cases(out / "calibration" / "same")
    assert [r["case_id"] for r in rows][:2] == ["Colin_Powell__p0__d0__s0", "Colin_Powell__p0__d0__s1"]
    assert all(float(r["pose_error"]) >= 0 and r["sim_arcface"] for r in rows)


def test_images_mode_counts_missing_and_faceless_outputs(calibrated, protocol_file, tmp_path):
    out, _ = calibrated
    images = tmp_path / "method"
    shutil.copytree(out / "calibration" / "same" / "images", images)
    (images / "Tony_Blair__p1__d0__s1.png").unlink()
    Image.fromarray(np.full((96, 96, 3), 128, np.uint8)).save(images / "Tony_Blair__p1__d0__s0.png")
    main(["--protocol", str(protocol_file), "--images", str(images), "--out", str(tmp_path / "scored")])
    rows = {r["case_id"]: r for r in cases(tmp_path / "scored")}
    assert len(rows) == 12  # every case is a row, whatever happened to it
    assert rows["Tony_Blair__p1__d0__s1"]["status"] == "missing_image"
    assert rows["Tony_Blair__p1__d0__s0"]["status"] == "no_face" and rows["Tony_Blair__p1__d0__s0"]["sim_dlib"] == ""
    summary = json.loads((tmp_path / "scored" / "summary.json").read_text())
    assert summary["detection"]["misses"] == 1 and summary["statuses"] == {"missing_image": 1, "no_face": 1, "scored": 10}
    assert summary["metrics"]["face_similarity/dlib"]["n"] == 10
    same = {r["case_id"]: r for r in cases(out / "calibration" / "same")}
    assert all(rows[k]["sim_dlib"] == same[k]["sim_dlib"] for k in rows if rows[k]["status"] == "scored")  # same code, same numbers


@pytest.mark.timeout(1200)  # the first user of the session's demo build and tiny run pays for them
def test_default_protocol_on_the_demo_heldout_identities_with_a_tiny_checkpoint(demo_build, tiny_run, tmp_path):
    from trainer.data import is_heldout

    demo, _, _ = demo_build
    run, _ = tiny_run
    out = tmp_path / "eval"
    main(["--protocol", str(REPO / "trainer/protocols/demo-heldout.yaml"), "--checkpoint", str(run),
          "--set", f"identities.shards={demo / 'shards'}", "--set", "generation.steps=2", "--out", str(out)])
    rows = cases(out)
    summary = json.loads((out / "summary.json").read_text())
    import pyarrow.parquet as pq

    heldout = sorted(i for i in pq.read_table(demo / "identities.parquet")["identity_id"].to_pylist() if is_heldout(i, 0.1))
    assert summary["identities"] == heldout and len(rows) == len(heldout) * 2 * 3
    assert sorted(p.stem for p in (out / "images").glob("*.png")) == sorted(r["case_id"] for r in rows)
    detection = summary["detection"]
    assert detection["images"] == len(rows) and detection["misses"] == sum(r["status"] == "no_face" for r in rows)
    dlib = summary["metrics"]["face_similarity/dlib"]
    assert dlib["n"] == len(rows) - detection["misses"]  # misses are counted, never averaged in
    assert dlib["conditions_generator"] is True  # the run's faces (default: dlib) condition the generator
    assert summary["mode"] == "checkpoint" and (out / "report.html").is_file()


def test_a_bad_protocol_is_one_plain_line(protocol_file, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(protocol_file.read_text().replace("references: 2", "references: 2\nreferenses: 3"))
    with pytest.raises(SystemExit, match=r"bad.yaml: referenses: Extra inputs are not permitted"):
        main(["--protocol", str(bad), "--calibrate", "--out", str(tmp_path / "x")])


def test_report_page_in_chromium(calibrated):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install it with scripts/ensure_chromium.sh (make test runs it)", pytrace=False)
    out, _ = calibrated
    page = out / "calibration" / "same" / "report.html"

    async def read():
        async with Browser() as browser:
            await browser.open(page.as_uri())
            state = await browser.evaluate("""(() => ({
                cases: [...document.querySelectorAll('.case')].map(c => c.dataset.case),
                outputs: [...document.querySelectorAll('img.output')].filter(i => i.complete && i.naturalWidth > 0).length,
                refs: [...document.querySelectorAll('img.ref')].filter(i => i.complete && i.naturalWidth > 0).length,
                metrics: [...document.querySelectorAll('#metrics tr')].slice(1).map(r => r.cells[0].textContent),
            }))()""")
            return state, browser.requested_urls()

    state, urls = asyncio.run(read())
    assert state["cases"] == [r["case_id"] for r in cases(out / "calibration" / "same")]
    assert state["outputs"] == 12 and state["refs"] == 12 * 2  # every picture decoded in the browser
    assert {"face_similarity/dlib", "face_similarity/arcface", "clip_t", "clip_i", "pose_error", "expression_error"} <= set(state["metrics"])
    assert all(u.startswith(("data:", "file:")) for u in urls), urls


def test_a_large_reference_photo_scores_the_face_the_build_and_inference_read(protocol_file, faces_dir, tmp_path):
    """A reference photo at web size (2,600 px) is decoded as the face stages and inference decode
    it (reduced scale), so its embedding is the one inference computes for the same file."""
    from test_faces_reader import web_size_copy

    from portrait.faces.reader import as_recorded
    from trainer.infer import open_photo
    from trainer.scoring.protocol import Identity, Photo, load_protocol
    from trainer.scoring.score import Scorers

    scorers = Scorers(load_protocol(protocol_file))
    photos = sorted((faces_dir / "dev" / "Tony_Blair").iterdir())[:2]
    large = web_size_copy(photos[0], tmp_path)
    identity = Identity("tony", "Tony Blair", [Photo(p.name, p.read_bytes()) for p in (large, photos[1])])
    subjects, left_out = scorers.prepare([identity])
    assert not left_out, left_out
    reference = subjects[0].references[0]
    rgb = open_photo(str(large), scorers.reader)
    assert reference.rgb.shape == rgb.shape and max(rgb.shape) < 2600  # not decoded in full
    face = as_recorded(scorers.reader.faces(rgb)[0])
    for recognizer in scorers.recognizers:
        assert np.array_equal(reference.embeddings[recognizer.name], recognizer.embed(rgb, face)), recognizer.name
