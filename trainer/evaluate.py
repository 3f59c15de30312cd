"""Evaluate a portrait generator on a fixed protocol with independent scorers.

    python -m trainer.evaluate --protocol trainer/protocols/demo-heldout.yaml --checkpoint runs/tiny --out eval/tiny
    python -m trainer.evaluate --protocol P.yaml --images DIR --out eval/instantid   # any method's images
    python -m trainer.evaluate --protocol P.yaml --calibrate --out eval/calibration

``--checkpoint`` generates every case of the protocol (``trainer/scoring/protocol.py``: held-out
identities, their k reference photos, prompts, driving photos, seeds) into ``OUT/images/`` and
scores them; ``--images DIR`` scores images some other method made, one per case, named
``CASE_ID.png`` (or .jpg, .jpeg, .webp; ``OUT/cases.csv`` of any run lists the ids, and
``--list-cases`` prints them), so every method is judged by the same code. ``--calibrate`` runs
the same scoring with real photos as outputs: held-out photos of the same person (not among the
references) and photos of other people, and writes both and how well each metric separates them.

Writes ``OUT/cases.csv``, ``OUT/summary.json`` and ``OUT/report.html`` (and
``OUT/calibration/{same,other}/`` plus ``OUT/calibration.json`` with ``--calibrate``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from portrait.decode import DecodeError
from trainer.scoring import outputs
from trainer.scoring.intervals import auc
from trainer.scoring.protocol import cases_for, load_protocol, read_identities


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", required=True, help="protocol YAML (trainer/protocols/)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="generate the cases with this checkpoint (or run folder: its latest)")
    source.add_argument("--images", help="score the images in this folder (CASE_ID.png/.jpg/.webp)")
    parser.add_argument("--calibrate", action="store_true", help="also score real photos: same person and other people")
    parser.add_argument("--list-cases", action="store_true", help="print the protocol's case ids and stop")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a protocol value, e.g. scorers.clip=/models/clip-vit-large-patch14")
    parser.add_argument("--faces", help="the generator's face settings (build.json, recipe or faces: file); "
                        "default: the run's faces.json, else the default settings")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None)
    args = parser.parse_args(argv)
    if not args.list_cases and not args.out:
        parser.error("--out is required")
    if not (args.list_cases or args.checkpoint or args.images or args.calibrate):
        parser.error("give --checkpoint RUN, --images DIR or --calibrate")
    return args


# ------------------------------------------------------------------ generation


def conditioning_reader(faces: str | None, checkpoint: str, scoring_reader):
    """(face reader the generator's inputs are read with, a note): ``--faces``, else the run's
    faces.json, else the default settings; the scoring reader itself when the settings are its."""
    from portrait.faces import FaceSettings
    from portrait.faces.reader import CropSettings, FaceReader, read_config
    from trainer.checkpoint import resolve_checkpoint
    from trainer.metrics import FACES_FILE

    recorded = resolve_checkpoint(checkpoint).parent.parent / FACES_FILE
    if faces:
        settings, crop, base_dir = read_config(faces)
        note = f"generator's faces from {faces}"
    elif recorded.is_file():
        record = json.loads(recorded.read_text())
        settings, crop, base_dir = FaceSettings.model_validate(record["faces"]), CropSettings(**record["crop"]), None
        note = f"generator's faces from {recorded}"
    else:
        settings, crop, base_dir = FaceSettings(), CropSettings(), None
        note = "the run has no faces.json (shards without a build.json): the generator's faces read with the default settings"
    if settings == scoring_reader.settings and crop == scoring_reader.crop and not settings.model_dir:
        return scoring_reader, note
    return FaceReader(settings, crop, base_dir), note


def conditioning_of(reader) -> dict:
    """What conditions the generator, to tell which similarity scorer is not independent of it."""
    from trainer.scoring.recognition import sha256_file

    recognition = getattr(reader.backend, "files", {}).get("recognition")  # insightface's ArcFace file
    return {"backend": reader.backend.name, "embedding_model": reader.embedding_model,
            "recognition_sha256": sha256_file(recognition) if recognition else None}


def generate(args, protocol, scorers, subjects, driving_photos, cases, folder: Path) -> tuple[dict, list[str]]:
    from trainer.pipeline import HiFiPortraitPipeline, analyse_photos, driving_landmarks
    from portrait.landmarks import render_landmarks

    reader, note = conditioning_reader(args.faces, args.checkpoint, scorers.reader)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtype = dtypes[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    pipe = HiFiPortraitPipeline.from_checkpoint(args.checkpoint, device=args.device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    size = protocol.generation.size or pipe.training_resolution
    if reader.embedding_dim != pipe.face_refiner.config.id_dim:
        raise ValueError(f"the checkpoint expects {pipe.face_refiner.config.id_dim}-d identity embeddings, {reader.embedding_model} "
                         f"gives {reader.embedding_dim}: give --faces of the build that made the training shards")
    by_slug = {s.identity.slug: s for s in subjects}
    drivings = [scorer_driving.rgb for scorer_driving in driving_photos]
    inputs, targets = {}, {}
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        subject = by_slug[case.identity]
        if case.identity not in inputs:
            inputs[case.identity] = analyse_photos([r.rgb for r in subject.references], reader, names=[r.name for r in subject.references])
        references = inputs[case.identity]
        target = (case.identity, case.driving_index)
        if target not in targets:
            targets[target] = driving_landmarks(drivings[case.driving_index], references, size, pipe.landmark_points, reader)
        landmarks = targets[target]
        image = pipe(
            prompt=case.prompt,
            reference_faces=[r.crop_image() for r in references],
            reference_embeddings=np.stack([r.embedding for r in references]),
            landmark_image=render_landmarks(landmarks, size),
            height=size,
            width=size,
            num_inference_steps=protocol.generation.steps,
            guidance_scale=protocol.generation.guidance,
            negative_prompt=protocol.generation.negative_prompt,
            generator=torch.Generator("cpu").manual_seed(case.seed),
        ).images[0]
        image.save(folder / f"{case.case_id}.png")
    return conditioning_of(reader), [note]


# ------------------------------------------------------------------ scoring and calibration


def score_folder(scorers, protocol, subjects, left_out, drivings, cases, folder: Path, out: Path, *, mode: str,
                 source: str | None, conditioning: dict | None = None, notes: list[str] = ()) -> dict:
    by_slug = {s.identity.slug: s for s in subjects}
    rows = [scorers.score(case, by_slug[case.identity], drivings[case.driving_index], folder) for case in cases]
    names = outputs.columns(scorers.recognizers)
    out.mkdir(parents=True, exist_ok=True)
    outputs.write_cases(rows, names, out / "cases.csv")
    info = outputs.summary(rows, scorers, protocol=protocol, mode=mode, source=source, conditioning=conditioning,
                           left_out=left_out, notes=list(notes))
    (out / "summary.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    outputs.report(rows, info, names, by_slug, drivings, folder, out / "report.html")
    return {"rows": rows, "summary": info}


def calibration_images(subjects, cases, folder: Path, same: bool) -> None:
    """Real photos as outputs: a held-out photo of the case's own identity (same), or a photo of
    the next identity in the protocol (other), cycling through the photos available. A case with
    no photo to show stays a counted missing_image."""
    from trainer.scoring.score import decode

    folder.mkdir(parents=True, exist_ok=True)
    order = [s.identity.slug for s in subjects]
    by_slug = {s.identity.slug: s for s in subjects}
    used: dict[str, int] = {}
    for case in cases:
        subject = by_slug[case.identity if same else order[(order.index(case.identity) + 1) % len(order)]]
        pool = [data for _, data in subject.spares]
        if not same:
            pool += [r.rgb for r in subject.references]
        if not pool:
            continue
        index = used.get(subject.identity.slug, 0)
        used[subject.identity.slug] = index + 1
        photo = pool[index % len(pool)]
        try:
            rgb = decode(photo) if isinstance(photo, bytes) else photo
        except DecodeError:
            continue
        Image.fromarray(rgb).save(folder / f"{case.case_id}.png")


def calibrate(scorers, protocol, subjects, left_out, drivings, cases, out: Path) -> dict:
    if len(subjects) < 2:
        raise ValueError("calibration needs at least two identities (other-person photos come from the next one)")
    results = {}
    for kind in ("same", "other"):
        folder = out / "calibration" / kind
        calibration_images(subjects, cases, folder / "images", same=kind == "same")
        results[kind] = score_folder(scorers, protocol, subjects, left_out, drivings, cases, folder / "images", folder,
                                     mode=f"calibration-{kind}", source=f"real photos ({kind} person)")
    table = {}
    for key, same in results["same"]["summary"]["metrics"].items():
        other = results["other"]["summary"]["metrics"][key]
        column = key.replace("face_similarity/", "sim_")
        separation = auc([r.get(column) for r in results["same"]["rows"]], [r.get(column) for r in results["other"]["rows"]])
        table[key] = {"model": same["model"], "model_sha256": same["model_sha256"],
                      "same": {k: same[k] for k in ("n", "mean", "ci95")}, "other": {k: other[k] for k in ("n", "mean", "ci95")},
                      "auc_same_over_other": separation}
    report = {"protocol": protocol.name, "metrics": table,
              "misses": {k: results[k]["summary"]["detection"]["misses"] for k in results}}
    (out / "calibration.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def run(args) -> dict:
    from trainer.scoring.score import Scorers

    protocol = load_protocol(args.protocol, args.set)
    identities = read_identities(protocol)
    if args.list_cases:
        for case in cases_for(protocol, identities):
            print(case.case_id)
        return {}
    if not identities:
        raise ValueError(f"{args.protocol}: the protocol names no identity that exists")
    scorers = Scorers(protocol, "cpu" if not args.device.startswith("cuda") else args.device)
    subjects, left_out = scorers.prepare(identities)
    if not subjects:
        raise ValueError(f"{args.protocol}: no identity has {protocol.references} usable reference photos ({left_out})")
    drivings = scorers.driving()
    cases = cases_for(protocol, [s.identity for s in subjects])
    out = Path(args.out)
    result = {}
    if args.checkpoint:
        conditioning, notes = generate(args, protocol, scorers, subjects, drivings, cases, out / "images")
        result["evaluation"] = score_folder(scorers, protocol, subjects, left_out, drivings, cases, out / "images", out,
                                            mode="checkpoint", source=str(args.checkpoint), conditioning=conditioning, notes=notes)["summary"]
    elif args.images:
        folder = Path(args.images)
        if not folder.is_dir():
            raise ValueError(f"--images: {folder} is not a folder")
        result["evaluation"] = score_folder(scorers, protocol, subjects, left_out, drivings, cases, folder, out,
                                            mode="images", source=str(folder))["summary"]
    if args.calibrate:
        result["calibration"] = calibrate(scorers, protocol, subjects, left_out, drivings, cases, out)
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        result = run(args)
    except (ValueError, FileNotFoundError) as exn:
        raise SystemExit(f"error: {exn}") from None
    if args.out and result:
        print(f"wrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
