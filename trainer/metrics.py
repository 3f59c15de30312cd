"""Face metrics of generated images, measured with the face reader of the build that made the
shards (``portrait.faces.reader``): the same backend, settings and embedding model.

Face similarity is the cosine between the generated face's embedding and each reference's
stored embedding (the shards' ``K.embedding.npy``); both come from the same model, named in
the summary (``similarity_model``), since similarity figures are only comparable per model.
Landmark error is the NME of the generated face's landmarks against the target's. A generated
image where the detector finds no face is a *miss*: counted and reported, never averaged in as
zero or left out silently.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from portrait.landmarks import landmark_error

# A run folder's record of the face settings of the build that made its shards (trainer.train
# writes it; trainer.infer reads it): portrait.faces.reader.record's JSON.
FACES_FILE = "faces.json"


def face_metrics(reader, generated: Image.Image, reference_embeddings, target_landmarks) -> dict:
    """Similarity to the references and landmark error of one generated image, or a miss."""
    reading = reader.read(np.asarray(generated.convert("RGB"), dtype=np.uint8))
    if reading is None:
        return {"detected": False, "similarity": None, "landmark_error": None}
    references = [np.asarray(r, dtype=np.float32) for r in reference_embeddings]
    similarity = None
    if references and all(r.shape == reading.embedding.shape for r in references):
        similarity = float(np.mean([float(reading.embedding @ r) for r in references]))
    error = landmark_error(reading.landmarks, target_landmarks) if target_landmarks is not None else None
    return {"detected": True, "similarity": similarity, "landmark_error": error}


def summarise(rows: list[dict], similarity_model: str | None = None) -> dict:
    detected = [r for r in rows if r["detected"]]
    sims = [r["similarity"] for r in detected if r["similarity"] is not None]
    errors = [r["landmark_error"] for r in detected if r["landmark_error"] is not None]
    return {
        "images": len(rows),
        "faces_detected": len(detected),
        "detector_misses": len(rows) - len(detected),
        "face_similarity": float(np.mean(sims)) if sims else None,
        "similarity_model": similarity_model,
        "landmark_error": float(np.mean(errors)) if errors else None,
    }
