"""Validation: generate images for held-out identities and measure them.

For each held-out example (a target's caption and landmarks, k references of the same identity,
none of which the trainer saw), the pipeline generates an image at the training resolution with
a fixed seed. Each image is measured with the face reader of the build that made the shards
(``portrait.faces.reader``; its settings come from the build.json beside the shards): face
similarity (cosine of the generated face's embedding with the references' stored embeddings,
one model for both) and landmark error (NME against the target landmarks); a generated image
without a detected face is a miss, counted. Shards without a build.json (test shards) are
measured with the default face settings (dlib), and the summary says so.
"""

from __future__ import annotations

import logging

import torch

from portrait.faces.reader import FaceReader
from trainer.metrics import face_metrics, summarise

log = logging.getLogger("trainer.validate")


class Validator:
    def __init__(self, examples: list[dict], steps: int, guidance: float, seed: int = 0, faces: dict | None = None):
        """``faces``: the face record of the build (``portrait.faces.reader.record``); None for
        the default settings."""
        self.examples = examples
        self.steps = steps
        self.guidance = guidance
        self.seed = seed
        self.faces = faces
        self.faces_source = "the build of the shards" if faces else "default settings (no build.json beside the shards)"
        self.unavailable: str | None = None
        self._reader: FaceReader | None = None

    def reader(self) -> FaceReader | None:
        if self._reader is None and self.unavailable is None:
            try:
                self._reader = FaceReader.from_record(self.faces) if self.faces else FaceReader()
            except (FileNotFoundError, ImportError, ValueError) as exn:  # models missing: say so, train on
                self.unavailable = f"face models unavailable: {exn}"
                log.warning("validation metrics: %s", self.unavailable)
        return self._reader

    def generate(self, pipe) -> list:
        pipe.set_progress_bar_config(disable=True)
        images = []
        for index, example in enumerate(self.examples):
            size = example["pixels"].shape[-1]
            generator = torch.Generator("cpu").manual_seed(self.seed + index)
            images.append(
                pipe(
                    prompt=example["caption"],
                    reference_faces=torch.from_numpy(example["reference_pixels"]),
                    reference_embeddings=example["reference_embeddings"],
                    landmark_image=torch.from_numpy(example["landmark_image"]),
                    height=size,
                    width=size,
                    num_inference_steps=self.steps,
                    guidance_scale=self.guidance,
                    generator=generator,
                ).images[0]
            )
        return images

    def measure(self, images: list) -> dict:
        reader = self.reader()
        if reader is None:
            return {"images": len(images), "metrics_unavailable": self.unavailable}
        rows = [
            face_metrics(reader, image, example["reference_embeddings"], example["landmarks"])
            for example, image in zip(self.examples, images)
        ]
        return {**summarise(rows, reader.embedding_model), "faces": self.faces_source}
