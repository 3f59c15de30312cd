"""Generate a portrait from reference photos, a prompt and a driving photo.

    python -m trainer.infer --checkpoint runs/tiny --reference a.jpg b.jpg c.jpg d.jpg \\
        --driving pose.jpg --prompt "a photo of a person smiling" --output out.png

Faces are read exactly as the build that made the training shards read them
(``portrait.faces.reader``): the same backend (dlib, or insightface from its local model folder),
settings, aligned crop and embedding model. The settings come from ``--faces`` (a build.json, a
recipe, or a file with a ``faces:`` section) or else from the run folder's ``faces.json``, which
training recorded from the build.json beside the shards.

References: the subject's face of each photo gives its aligned crop, landmarks and embedding
(``--reference-embeddings FILE.npy`` replaces the embeddings). Target landmarks: the driving
photo's 68 landmarks, retargeted to the references' face shape
(``portrait.landmarks.retarget_landmarks``, a 2D stand-in for the paper's 3D landmark generator),
placed in the output frame the way training crops are made (a square around the face box). Or
give ``--landmarks FILE.npy`` with points already in output pixels.
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
from portrait.faces.reader import FaceReader
from portrait.landmarks import render_landmarks
from trainer.usage import FILE_ERRORS, Parser, UsageError, first_line, positive_int, quiet_libraries, run


def parse_args(argv=None) -> argparse.Namespace:
    parser = Parser(prog="python -m trainer.infer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its latest)")
    parser.add_argument("--reference", nargs="+", required=True, help="photos of the identity")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--driving", help="photo whose pose and expression the output takes")
    parser.add_argument("--landmarks", help="target landmarks .npy ([68,2] or [5,2], output pixels) instead of --driving")
    parser.add_argument("--reference-embeddings", help=".npy [k, D] identity embeddings instead of the face reader's")
    parser.add_argument("--faces", help="face settings: a build.json, a recipe, or a file with a faces: section "
                        "(default: the run folder's faces.json, recorded from the training shards' build)")
    parser.add_argument("--output", default="portrait.png")
    parser.add_argument("--landmark-image", help="also save the rendered landmark condition here")
    parser.add_argument("--size", type=positive_int, default=None, help="output side in pixels (default: training resolution)")
    parser.add_argument("--steps", type=positive_int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="frozen base's dtype (default bf16 on GPU, fp32 on CPU); trained parts stay fp32")
    return parser.parse_args(argv)


def open_photo(path: str, reader: FaceReader) -> np.ndarray:
    """The photo's pixels as the build's face stages decode them (``FaceReader.load_photo``)."""
    try:
        return reader.load_photo(Path(path).read_bytes())
    except OSError as exn:
        raise UsageError(f"{path}: cannot read the file ({exn.strerror or exn})") from None
    except DecodeError as exn:
        raise UsageError(f"{path}: not a usable image ({exn.reason}: {exn.detail})") from None


def face_reader(faces: str | None, checkpoint: str) -> FaceReader:
    """The reader of ``--faces``, else of the run's recorded faces.json; a plain error otherwise."""
    from trainer.checkpoint import resolve_checkpoint
    from trainer.metrics import FACES_FILE

    try:
        if faces:
            return FaceReader.from_config(faces)
        run = resolve_checkpoint(checkpoint).parent.parent
        recorded = run / FACES_FILE
        if not recorded.is_file():
            raise UsageError(
                f"{recorded} not found: the run was trained on shards without a build.json beside them; "
                "give --faces (the build.json or recipe of the build that made the shards, or a file with a faces: section)"
            )
        return FaceReader.from_record(json.loads(recorded.read_text()))
    except FileNotFoundError as exn:
        raise UsageError(str(exn)) from None
    except ValueError as exn:
        raise UsageError(str(exn)) from None


def load_npy(path: str, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False).astype(np.float32)
    except FILE_ERRORS as exn:
        raise UsageError(f"{path}: cannot read {what} from it ({first_line(exn)}); expected a .npy file of numbers") from None


def main(argv=None) -> Path:
    from trainer.pipeline import HiFiPortraitPipeline, analyse_photos, driving_landmarks

    args = parse_args(argv)
    quiet_libraries()
    faces = face_reader(args.faces, args.checkpoint)  # before the models load: a wrong setting fails fast
    try:
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        dtype = dtypes[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
        pipe = HiFiPortraitPipeline.from_checkpoint(args.checkpoint, device=args.device, dtype=dtype)
    except FILE_ERRORS as exn:  # missing, damaged or misplaced checkpoint files
        raise UsageError(f"--checkpoint {args.checkpoint}: cannot load it: {first_line(exn)}") from None
    size = args.size or pipe.training_resolution
    if size % pipe.size_multiple:
        raise UsageError(f"--size {size}: this model makes images whose side is a multiple of {pipe.size_multiple}")

    try:
        references = analyse_photos([open_photo(p, faces) for p in args.reference], faces, names=args.reference)
    except ValueError as exn:
        raise UsageError(str(exn)) from None
    if args.reference_embeddings:
        embeddings = load_npy(args.reference_embeddings, "identity embeddings")
    else:
        embeddings = np.stack([r.embedding for r in references])
    expected = pipe.face_refiner.config.id_dim
    if embeddings.ndim != 2 or embeddings.shape[1] != expected or len(embeddings) != len(references):
        raise UsageError(
            f"the checkpoint expects one {expected}-d identity embedding per reference, got {embeddings.shape}"
            + ("" if args.reference_embeddings else f" from {faces.embedding_model}; give --faces of the build that made the training shards")
        )
    if args.landmarks:
        landmarks = load_npy(args.landmarks, "landmarks")
        if landmarks.shape not in ((68, 2), (5, 2)):
            raise UsageError(f"{args.landmarks}: landmarks must be 68x2 or 5x2, got {landmarks.shape}")
    elif args.driving:
        try:
            landmarks = driving_landmarks(open_photo(args.driving, faces), references, size, pipe.landmark_points, faces)
        except ValueError as exn:
            raise UsageError(f"{args.driving}: {exn}") from None
    else:
        raise UsageError("give --driving PHOTO or --landmarks FILE.npy for the target pose and expression")
    condition = render_landmarks(landmarks, size)
    if args.landmark_image:
        Path(args.landmark_image).parent.mkdir(parents=True, exist_ok=True)
        condition.save(args.landmark_image)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    image = pipe(
        prompt=args.prompt,
        reference_faces=[r.crop_image() for r in references],
        reference_embeddings=embeddings,
        landmark_image=condition,
        height=size,
        width=size,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        negative_prompt=args.negative_prompt,
        generator=generator,
    ).images[0]
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    image.save(output)
    print(f"wrote {output} ({image.width}x{image.height})", file=sys.stderr)
    return output


if __name__ == "__main__":
    sys.exit(run(main))
