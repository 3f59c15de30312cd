"""Score a folder of case images against a protocol: one row per case, never a case lost.

The references and driving photos are read once (``Scorers.prepare``): each reference's face by
the protocol's face reader, embedded by every recognition model, and its CLIP image embedding;
each driving photo's head pose and expression. Every photo is decoded as the build's face stages
decode it (``FaceReader.load_photo``: a large JPEG at a reduced scale), so a face scores as the
build and inference read it. Then each case's image is read the same way
(``Scorers.score``): a missing or undecodable file, or a face the detector does not find, is a row
with its status, and the scores that need a face are left empty there (CLIP-T and CLIP-I, which
need none, are still given). Figures are summarised only over the rows that have them, and the
misses are counted beside them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from portrait.decode import DecodeError
from portrait.faces.reader import FaceReader, as_recorded, load_photo
from trainer.scoring import headpose
from trainer.scoring.protocol import Case, Identity, Protocol, find_image
from trainer.scoring.recognition import load_recognizers


@dataclass
class Reference:
    name: str
    rgb: np.ndarray
    embeddings: dict[str, np.ndarray]  # recognizer name -> embedding


@dataclass
class Subject:
    """One identity of the protocol: its k references and the photos left for calibration."""

    identity: Identity
    references: list[Reference] = field(default_factory=list)
    spares: list[tuple[str, bytes]] = field(default_factory=list)
    clip: np.ndarray | None = None  # (k, d) CLIP image embeddings of the references
    skipped: list[str] = field(default_factory=list)  # photos passed over, with why


@dataclass
class Driving:
    path: Path
    rgb: np.ndarray
    pose: dict | None
    expression: dict | None


def decode(data: bytes) -> np.ndarray:
    """A photo's full pixels (calibration writes real photos out as outputs)."""
    return load_photo(data)


class Scorers:
    def __init__(self, protocol: Protocol, device: str = "cpu"):
        self.protocol = protocol
        self.reader = FaceReader(protocol.faces, base_dir=protocol.base_dir)
        self.recognizers = load_recognizers(protocol.scorers.recognition, protocol.path, self.reader.backend)
        self.clip = None
        if protocol.scorers.clip:
            from trainer.scoring.clip import ClipScorer

            self.clip = ClipScorer(protocol.path(protocol.scorers.clip), device)
        self.prompt_embeddings = self.clip.text_embeddings(protocol.prompts) if self.clip else None

    # ------------------------------------------------------------------ references, driving

    def prepare(self, identities: list[Identity]) -> tuple[list[Subject], list[dict]]:
        """(subjects with k usable references, identities left out with the reason)."""
        k = self.protocol.references
        subjects, left_out = [], []
        for identity in identities:
            subject = Subject(identity)
            for photo in identity.photos:
                if len(subject.references) == k:
                    subject.spares.append((photo.name, photo.data))
                    continue
                try:
                    rgb = self.reader.load_photo(photo.data)
                except DecodeError as exn:
                    subject.skipped.append(f"{photo.name}: {exn.reason}")
                    continue
                reading = self.reader.faces(rgb)
                if not reading:
                    subject.skipped.append(f"{photo.name}: no face")
                    continue
                face = as_recorded(reading[0])
                embeddings = {r.name: r.embed(rgb, face) for r in self.recognizers}
                subject.references.append(Reference(photo.name, rgb, embeddings))
            if len(subject.references) < k:
                left_out.append({"identity": identity.slug, "label": identity.label,
                                 "reason": f"{len(subject.references)} usable photos, {k} references needed",
                                 "skipped": subject.skipped})
                continue
            if self.clip:
                subject.clip = self.clip.image_embeddings([Image.fromarray(r.rgb) for r in subject.references])
            subjects.append(subject)
        return subjects, left_out

    def driving(self) -> list[Driving]:
        out = []
        for path in self.protocol.driving_paths():
            try:
                rgb = self.reader.load_photo(path.read_bytes())
            except DecodeError as exn:
                raise ValueError(f"driving photo {path}: not a usable image ({exn.reason})") from None
            pose, expression = self.pose_and_expression(rgb)
            if pose is None:
                raise ValueError(f"driving photo {path}: no face with 68 landmarks found by the {self.reader.backend.name} detector")
            out.append(Driving(path, rgb, pose, expression))
        return out

    def pose_and_expression(self, rgb: np.ndarray, face=None) -> tuple[dict | None, dict | None]:
        if face is None:
            faces = self.reader.faces(rgb)
            face = as_recorded(faces[0]) if faces else None
        if face is None or face.landmarks68 is None:
            return None, None
        height, width = rgb.shape[:2]
        try:
            return headpose.head_pose(face.landmarks68, width, height), headpose.expression(face.landmarks68, width, height)
        except ValueError:  # the mean face does not fit these landmarks: no pose, the case goes on
            return None, None

    # ------------------------------------------------------------------ one case

    def score(self, case: Case, subject: Subject, driving: Driving, folder: Path) -> dict:
        row = {"case_id": case.case_id, "identity": case.identity, "label": subject.identity.label,
               "prompt_index": case.prompt_index, "prompt": case.prompt, "driving_index": case.driving_index,
               "driving": driving.path.name, "seed": case.seed}
        path = find_image(folder, case.case_id)
        row["image"] = path.name if path else None
        if path is None:
            return {**row, "status": "missing_image"}
        try:
            rgb = self.reader.load_photo(path.read_bytes())
        except DecodeError as exn:
            return {**row, "status": f"undecodable:{exn.reason}"}
        if self.clip:
            image = self.clip.image_embeddings([Image.fromarray(rgb)])[0]
            row["clip_t"] = float(image @ self.prompt_embeddings[case.prompt_index])
            row["clip_i"] = float(np.mean(subject.clip @ image))
        faces = self.reader.faces(rgb)
        if not faces:
            return {**row, "status": "no_face"}
        face = as_recorded(faces[0])
        row.update(status="scored", face_score=float(face.score))
        for recognizer in self.recognizers:
            embedding = recognizer.embed(rgb, face)
            row[f"sim_{recognizer.name}"] = recognizer.similarity(embedding, [r.embeddings[recognizer.name] for r in subject.references])
        pose, expression = self.pose_and_expression(rgb, face)
        if pose is not None:
            errors = headpose.pose_error(pose, driving.pose)
            row.update({f"{a}_error": errors[a] for a in headpose.ANGLES}, pose_error=errors["mean"])
            row["expression_error"] = headpose.expression_error(expression, driving.expression)
        return row
