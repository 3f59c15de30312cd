"""Caption stage: the text prompt that goes with each kept image.

``mode: template`` (the offline default) writes the caption from the attributes, so it says
only what the manifest already knows: "a close-up portrait photo of a woman in her thirties",
"a photo of a man", "a photo of a person". Same attributes, same caption. caption_source is
"template".

``mode: vlm`` runs an image-captioning model from a local folder with transformers
(``AutoModelForImageTextToText`` + ``AutoProcessor``: the tests run tiny random BLIP and
Florence-2 models built from their configs; BLIP-2 loads the same way. Florence-2 gets the task
token ``<MORE_DETAILED_CAPTION>`` unless the recipe's ``prompt`` says otherwise). Chat-style
Qwen2.5-VL does not run on this stack yet: transformers 5.23's Qwen2.5-VL processor needs the
torchvision video processor, and torchvision cannot be installed here.
Images go through in batches on the recipe's device and dtype; decoding is greedy so the same
weights give the same captions. caption_source is "vlm:<model folder name>".

A model's caption is checked before it is used: an empty one, or one that names the person (a
word of the row's label, e.g. "Powell" for Colin_Powell: prompts must not teach the generator
names) is replaced by the template caption, and caption_source says why:
"template:fallback:vlm_empty" or "template:fallback:vlm_names_person".
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import Field, model_validator

from portrait.decode import load_rgb
from datakit.stage import Output, Stage, StageSettings, column
from datakit.store import file_sha256

TEMPLATE = "template"

DECADES = {2: "twenties", 3: "thirties", 4: "forties", 5: "fifties", 6: "sixties", 7: "seventies", 8: "eighties", 9: "nineties"}


class CaptionSettings(StageSettings):
    mode: Literal["template", "vlm"] = "template"
    # template
    closeup_area_fraction: float = Field(default=0.3, gt=0, le=1)  # face box share for "close-up"
    # vlm
    model_path: str | None = None
    device: Literal["cpu", "cuda", "auto"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_size: int = Field(default=16, ge=1)
    max_new_tokens: int = Field(default=40, ge=1)
    prompt: str | None = None  # text the caption starts from (BLIP: "a photo of"; Florence-2: a task token)

    @model_validator(mode="after")
    def _vlm_needs_model(self):
        if self.mode == "vlm" and not self.model_path:
            raise ValueError("caption.model_path is required when caption.mode is vlm")
        return self


# ---------------------------------------------------------------- template


def subject_words(gender: str | None, age: float | None) -> tuple[str, str]:
    """("a woman", "her") and the like; children and teenagers get their own nouns."""
    noun, pronoun = {"female": ("woman", "her"), "male": ("man", "his")}.get(gender, ("person", "their"))
    if age is not None and age < 13:
        noun = {"female": "girl", "male": "boy"}.get(gender, "child")
    elif age is not None and age < 18:
        noun = {"female": "teenage girl", "male": "teenage boy"}.get(gender, "teenager")
    elif age is not None and age < 20:
        noun = f"young {noun}"
    return f"a {noun}", pronoun


def age_phrase(age: float | None, pronoun: str) -> str:
    if age is None or age < 20:
        return ""
    decade = min(int(age) // 10, 9)
    return f" in {pronoun} {DECADES[decade]}"


def template_caption(gender: str | None, age: float | None, area_fraction: float | None, closeup: float) -> str:
    framing = "a close-up portrait photo" if area_fraction is not None and area_fraction >= closeup else "a photo"
    subject, pronoun = subject_words(gender, age)
    return f"{framing} of {subject}{age_phrase(age, pronoun)}"


# ---------------------------------------------------------------- vlm

# model_type -> the prompt used when the recipe gives none
DEFAULT_PROMPTS = {"florence2": "<MORE_DETAILED_CAPTION>"}


def model_folder(model_path: str, base_dir: str | None) -> Path:
    """caption.model_path; a relative path is taken from the recipe's folder."""
    path = Path(model_path).expanduser()
    return Path(base_dir) / path if not path.is_absolute() and base_dir else path


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("caption.device is cuda but torch sees no CUDA device; use cpu or auto")
    return device


class VlmCaptioner:
    """A local image-captioning model: images in, one string each out."""

    def __init__(self, settings: CaptionSettings, base_dir: str | None = None):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = model_folder(settings.model_path, base_dir)
        problem = "no such folder" if not path.is_dir() else "no config.json in that folder"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"caption.model_path {str(path)!r}: {problem}; point it at a local folder saved with "
                "save_pretrained (a BLIP captioning model with its processor); nothing is downloaded"
            )
        self.device = resolve_device(settings.device)
        self.dtype = getattr(torch, settings.dtype)
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForImageTextToText.from_pretrained(
            path, local_files_only=True, use_safetensors=True, dtype=self.dtype
        ).to(self.device)
        self.model.eval()
        self.name = path.name
        self.settings = settings
        # Florence-2 is steered by a task token; its most detailed caption describes hair,
        # clothing, expression, light and setting (never a name: it has none to give)
        self.prompt = settings.prompt or DEFAULT_PROMPTS.get(self.model.config.model_type)

    def caption(self, images: list) -> list[str]:
        import torch

        kwargs = {"images": images, "return_tensors": "pt"}
        if self.prompt:
            kwargs["text"] = [self.prompt] * len(images)
        inputs = self.processor(**kwargs).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=self.settings.max_new_tokens, do_sample=False, num_beams=1)
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]


# ---------------------------------------------------------------- stage


class CaptionStage(Stage):
    name = "caption"
    kind = "partition"
    uses_model = True  # the vlm mode's model; the template mode is cheap either way
    batch_invariant = False  # the model runs on batches
    Settings = CaptionSettings

    adds = ("caption", "caption_source")

    def __init__(self, settings, context):
        super().__init__(settings, context)
        self.captioner: VlmCaptioner | None = None
        template = ("gender", "age", "face_area_fraction")
        # vlm: the label to catch a caption naming the person, the template's columns to fall back
        self.reads = template if settings.mode == "template" else ("image_bytes", "label", *template)

    @classmethod
    def provenance(cls, settings, context) -> dict:
        if settings.mode != "vlm":
            return {"mode": "template"}
        path = model_folder(settings.model_path, context.get("recipe_dir"))
        files = {p.name: file_sha256(p)[0] for p in sorted(path.iterdir()) if p.is_file()} if path.is_dir() else {}
        return {"mode": "vlm", "model_path": str(path), "files_sha256": files}

    def setup(self) -> None:
        if self.settings.mode == "vlm" and self.captioner is None:
            self.captioner = VlmCaptioner(self.settings, self.context.get("recipe_dir"))

    def process(self, rows: pa.Table) -> Output:
        if self.settings.mode == "template":
            return self._template(rows)
        self.setup()
        return self._vlm(rows)

    def _template(self, rows: pa.Table) -> Output:
        genders, ages, areas = column(rows, "gender"), column(rows, "age"), column(rows, "face_area_fraction")
        close = self.settings.closeup_area_fraction
        captions = [template_caption(g, a, f, close) for g, a, f in zip(genders, ages, areas)]
        return Output({"caption": captions, "caption_source": [TEMPLATE] * len(captions)})

    def _vlm(self, rows: pa.Table) -> Output:
        """Caption in batches; an image that will not decode is dropped as stage_error."""
        out = Output({c: [None] * rows.num_rows for c in self.adds})
        images = {}
        for i, data in enumerate(rows.column("image_bytes").to_pylist()):
            try:
                images[i] = load_rgb(data)
            except Exception as e:  # download accepted these bytes, so this is rare; never silent
                out.drops[i] = ("stage_error", f"decoding for the caption model: {type(e).__name__}: {e}")
        order = list(images)
        size = self.settings.batch_size
        labels = column(rows, "label")
        genders, ages, areas = column(rows, "gender"), column(rows, "age"), column(rows, "face_area_fraction")
        close = self.settings.closeup_area_fraction
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            for i, text in zip(batch, self.captioner.caption([images[i] for i in batch])):
                problem = caption_problem(text, labels[i])
                if problem is None:
                    out.values["caption"][i], out.values["caption_source"][i] = text, f"vlm:{self.captioner.name}"
                else:
                    out.values["caption"][i] = template_caption(genders[i], ages[i], areas[i], close)
                    out.values["caption_source"][i] = f"{TEMPLATE}:fallback:{problem}"
        return out


def caption_problem(text: str | None, label: str | None) -> str | None:
    """Why a model's caption cannot be used, or None: empty, or it names the person."""
    if not text or not any(ch.isalpha() for ch in text):
        return "vlm_empty"
    words = {w.casefold() for w in re.findall(r"[^\W\d_]+", text)}
    name_words = {w.casefold() for w in re.findall(r"[^\W\d_]+", label or "") if len(w) >= 3}
    return "vlm_names_person" if words & name_words else None
