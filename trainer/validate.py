"""Validation: generate images for held-out identities and measure them.

For each held-out example (a target's caption and landmarks, k references of the same identity,
none of which the trainer saw), the pipeline generates an image at the training resolution with
a fixed seed. With dlib available, each image gets face similarity (cosine of dlib embeddings,
generated face vs. each reference) and landmark error (NME of dlib's 68 points on the generated
face against the target landmarks); a generated image without a detected face is a miss, counted.
"""

from __future__ import annotations

import logging

import torch

from trainer.metrics import DlibFaces, dlib_unavailable_reason, face_metrics, summarise

log = logging.getLogger("trainer.validate")


class Validator:
    def __init__(self, examples: list[dict], steps: int, guidance: float, seed: int = 0):
        self.examples = examples
        self.steps = steps
        self.guidance = guidance
        self.seed = seed
        self.unavailable = dlib_unavailable_reason()
        self.faces = None if self.unavailable else DlibFaces()
        self.reference_misses = 0
        if self.faces:
            self._embed_references()

    def _embed_references(self) -> None:
        for example in self.examples:
            embeddings = []
            for image, box in zip(example["reference_images"], example["reference_boxes"]):
                result = self.faces.analyze(image, box=box)
                if result is None:
                    self.reference_misses += 1
                else:
                    embeddings.append(result.embedding)
            example["metric_embeddings"] = embeddings

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
        if self.faces is None:
            return {"images": len(images), "metrics_unavailable": self.unavailable}
        rows = [
            face_metrics(self.faces, image, example["metric_embeddings"], example["landmarks"])
            for example, image in zip(self.examples, images)
        ]
        return summarise(rows, self.reference_misses)
