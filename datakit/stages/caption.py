"""Caption stage: the text prompt that goes with each kept image.

``mode: template`` (the offline default) writes the caption from the attributes, so it says
only what the manifest already knows: "a close-up portrait photo of a woman in her thirties",
"a photo of a man", "a photo of a person". Same attributes, same caption. caption_source is
"template".

``mode: vlm`` runs a vision-language model from a local folder with transformers
(``AutoModelForImageTextToText``; nothing is downloaded). Two kinds:

- captioners (BLIP, BLIP-2, Florence-2): the image and an optional text the caption starts
  from; Florence-2 gets the task token ``<MORE_DETAILED_CAPTION>`` unless the recipe's
  ``prompt`` says otherwise;
- chat models (Qwen2.5-VL, Qwen2-VL, and any model whose processor has a chat template): one
  user turn holding the image and a written prompt (``CHAT_PROMPT``: hair, clothing,
  expression, lighting and setting, never who the person is), left-padded so a batch of images
  of different sizes generates in one call; only the new tokens are the caption. Qwen's
  processor is built without its video processor (``StillImageProcessor``): transformers'
  video processors need torchvision, which this project does not install, and a caption needs
  none.

Images go through in batches on the recipe's device and dtype; decoding is greedy so the same
weights give the same captions. caption_source is "vlm:<model folder name>".

A model's caption is checked before it is used (``caption_problem``): an empty one, one that
names the person (a word of the row's label, e.g. "Powell" for Colin_Powell), or one that names
anybody (a person-name pattern: a first name from gender-guesser's list followed by a
capitalised word, "Tom Hanks"; or a title and a capitalised word, "Dr. Smith") is replaced by
the template caption: prompts must not teach the generator names. caption_source then says
"template:fallback:<code>" (codes in ``datakit.schema.CAPTION_FALLBACKS``) and caption_detail
says what was found.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Literal

import pyarrow as pa
from PIL import Image
from pydantic import Field, model_validator

from portrait.decode import load_rgb
from datakit import schema
from datakit.stage import Output, Stage, StageSettings, column
from datakit.store import file_sha256

TEMPLATE = "template"

DECADES = {2: "twenties", 3: "thirties", 4: "forties", 5: "fifties", 6: "sixties", 7: "seventies", 8: "eighties", 9: "nineties"}


class CaptionSettings(StageSettings):
    mode: Literal["template", "vlm"] = "template"  # template: from the attributes, offline; vlm: a local vision-language model
    # template
    closeup_area_fraction: float = Field(default=0.3, gt=0, le=1)  # face box share for "close-up"
    # vlm
    model_path: str | None = None
    device: Literal["cpu", "cuda", "auto"] = "auto"  # vlm: auto takes cuda when torch sees a GPU
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # vlm: weights dtype (bfloat16 on a GPU)
    batch_size: int = Field(default=16, ge=1)  # vlm: images per generate call
    max_new_tokens: int = Field(default=40, ge=1)  # vlm: longest caption, tokens
    # the longer side an image is shrunk to before the model sees it: a chat model such as
    # Qwen2.5-VL makes image tokens in proportion to the pixels (a 4000x3000 web photo: ~15k)
    max_side: int = Field(default=1024, ge=32)
    # BLIP: the text the caption starts from ("a photo of"); Florence-2: a task token; chat
    # models: the instruction (default CHAT_PROMPT)
    prompt: str | None = None

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

# the chat models' instruction: what the paper's captions (Fig. 14) describe, and never a name
CHAT_PROMPT = (
    "Write a caption for this photo in one or two sentences. Describe the person's hair, clothing "
    "and facial expression, the lighting and the setting. Do not say or guess who the person is: "
    "call them a man, a woman or a person."
)


def still_image_processor(model_type: str):
    """The processor class of a chat model whose transformers processor would also build a
    video processor (Qwen2-VL, Qwen2.5-VL), taking only an image processor and a tokenizer;
    None for every other model (AutoProcessor loads those)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

    base = {"qwen2_5_vl": Qwen2_5_VLProcessor, "qwen2_vl": Qwen2VLProcessor}.get(model_type)
    if base is None:
        return None

    class StillImageProcessor(base):
        # ProcessorMixin takes its parts from __init__'s parameters: without video_processor
        # none is loaded or checked, so torchvision is never imported (captions are of stills)
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    # named as its base, so that a folder it saves says processor_class Qwen2_5_VLProcessor like
    # any Qwen folder
    StillImageProcessor.__name__ = StillImageProcessor.__qualname__ = base.__name__
    return StillImageProcessor


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
    """A local vision-language model: images in, one caption each out."""

    def __init__(self, settings: CaptionSettings, base_dir: str | None = None):
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        path = model_folder(settings.model_path, base_dir)
        problem = "no such folder" if not path.is_dir() else "no config.json in that folder"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"caption.model_path {str(path)!r}: {problem}; point it at a local folder saved with "
                "save_pretrained (a captioning or chat vision-language model with its processor); nothing is downloaded"
            )
        self.device = resolve_device(settings.device)
        self.dtype = getattr(torch, settings.dtype)
        model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
        processor_class = still_image_processor(model_type) or AutoProcessor
        self.processor = processor_class.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForImageTextToText.from_pretrained(
            path, local_files_only=True, use_safetensors=True, dtype=self.dtype
        ).to(self.device)
        self.model.eval()
        self.name = path.name
        self.settings = settings
        self.chat = getattr(self.processor, "chat_template", None) is not None
        if self.chat:
            # a decoder-only model continues the longest prompt of the batch: pad on the left
            self.processor.tokenizer.padding_side = "left"
            self.prompt = settings.prompt or CHAT_PROMPT
        else:
            # Florence-2's most detailed caption describes hair, clothing, expression, light
            # and setting (never a name: it has none to give)
            self.prompt = settings.prompt or DEFAULT_PROMPTS.get(model_type)

    def chat_text(self) -> str:
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
        return self.processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)

    def caption(self, images: list) -> list[str]:
        """One generate call for the whole batch."""
        import torch

        kwargs = {"images": images, "return_tensors": "pt"}
        if self.chat:
            kwargs.update(text=[self.chat_text()] * len(images), padding=True)
        elif self.prompt:
            kwargs["text"] = [self.prompt] * len(images)
        inputs = self.processor(**kwargs).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=self.settings.max_new_tokens, do_sample=False, num_beams=1)
        if self.chat:  # the chat prompt is not part of the caption
            ids = ids[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]


# ---------------------------------------------------------------- stage


class CaptionStage(Stage):
    name = "caption"
    kind = "partition"
    uses_model = True  # the vlm mode's model; the template mode is cheap either way
    batch_invariant = False  # the vlm mode's model runs on batches (see __init__)
    Settings = CaptionSettings

    adds = ("caption", "caption_source", "caption_detail")

    def __init__(self, settings, context):
        super().__init__(settings, context)
        self.captioner: VlmCaptioner | None = None
        self.first_names: FirstNames | None = None
        template = ("gender", "age", "face_area_fraction")
        # vlm: the label to catch a caption naming the person, the template's columns to fall back
        self.reads = template if settings.mode == "template" else ("image_bytes", "label", *template)
        self.batch_invariant = settings.mode == TEMPLATE  # a template caption is written row by row

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
            self.first_names = first_names()

    def process(self, rows: pa.Table) -> Output:
        if self.settings.mode == "template":
            return self._template(rows)
        self.setup()
        return self._vlm(rows)

    def _template(self, rows: pa.Table) -> Output:
        genders, ages, areas = column(rows, "gender"), column(rows, "age"), column(rows, "face_area_fraction")
        close = self.settings.closeup_area_fraction
        captions = [template_caption(g, a, f, close) for g, a, f in zip(genders, ages, areas)]
        n = len(captions)
        return Output({"caption": captions, "caption_source": [TEMPLATE] * n, "caption_detail": [None] * n})

    def _vlm(self, rows: pa.Table) -> Output:
        """Caption in batches; an image that will not decode is dropped as stage_error."""
        out = Output({c: [None] * rows.num_rows for c in self.adds})
        images = {}
        for i, data in enumerate(rows.column("image_bytes").to_pylist()):
            try:
                images[i] = shrunk(load_rgb(data), self.settings.max_side)
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
                problem = caption_problem(text, labels[i], self.first_names)
                if problem is None:
                    out.values["caption"][i], out.values["caption_source"][i] = text, f"vlm:{self.captioner.name}"
                else:
                    code, detail = problem
                    out.values["caption"][i] = template_caption(genders[i], ages[i], areas[i], close)
                    out.values["caption_source"][i] = f"{TEMPLATE}:fallback:{schema.check_caption_fallback(code)}"
                    out.values["caption_detail"][i] = detail
        return out


def shrunk(image, max_side: int):
    """The image with its longer side at most max_side (aspect kept, bicubic: deterministic)."""
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


# ---------------------------------------------------------------- checking a model's caption

WORD = re.compile(r"[^\W\d_]+")
# a capitalised word followed by another: a name when the first is a first name (a lookahead, so
# that every pair is tried: "Smiling Tom Hanks"); and a title followed by a capitalised word
CAPITALISED_PAIR = re.compile(r"\b([A-Z][a-z]+(?:-[A-Z][a-z]+)?)(?=(\s+[A-Z][a-z]+(?:-[A-Z][a-z]+)?)\b)")
TITLED_NAME = re.compile(
    r"\b(?:Mr|Mrs|Ms|Miss|Dr|Prof|Sir|Dame|Lady|Lord|President|Senator|Governor|Prince|Princess|King|Queen)"
    r"\.?\s+[A-Z][a-z]+\b"
)

# ordinary caption words that gender-guesser also lists as first names ("The", "Red", "Summer"):
# capitalised at a sentence's start or in a title-case caption they are not a name
ORDINARY_WORDS = frozenset(
    "The An In On His Man Men Boy Red Gray Young Long Sunny Rose Summer Dawn Amber Hazel Ginger Joy Sky "
    "Autumn Spring Sage Ivy Holly Pearl Ruby Jade Crystal Violet Olive Lily Rusty Stone River Forest Rain "
    "Storm Hope Faith Grace Honey Candy Cherry Coral Velvet Silver Moon Sun Night Misty Door Will Art".split()
)


class FirstNames:
    """gender-guesser's offline list of first names (the attributes stage's name list)."""

    def __init__(self):
        import gender_guesser.detector

        self._detector = gender_guesser.detector.Detector(case_sensitive=False)

    def __contains__(self, word: str) -> bool:
        first = word.split("-")[0]
        return first not in ORDINARY_WORDS and self._detector.get_gender(first) != "unknown"


@functools.cache
def first_names() -> FirstNames:
    """One list per process (loading it takes about a second)."""
    return FirstNames()


def caption_problem(text: str | None, label: str | None, first_names=()) -> tuple[str, str] | None:
    """Why a model's caption cannot be used, as (code from schema.CAPTION_FALLBACKS, plain
    words), or None: it is empty, names the person (a word of 3+ letters of the label), or names
    somebody (a title and a capitalised word; or a first name in ``first_names`` followed by a
    capitalised word: "Tom Hanks", not "Brown hair" nor "The Man")."""
    if not text or not any(ch.isalpha() for ch in text):
        return "vlm_empty", f"the model's caption has no words: {text!r}"
    name_words = {w.casefold() for w in WORD.findall(label or "") if len(w) >= 3}
    said = sorted({w for w in WORD.findall(text) if w.casefold() in name_words})
    if said:
        return "vlm_names_person", f"the model's caption says {', '.join(said)} (from the label {label!r})"
    titled = TITLED_NAME.search(text)
    if titled:
        return "vlm_names_someone", f"the model's caption names {titled.group(0)!r}"
    named = next((m for m in CAPITALISED_PAIR.finditer(text) if m.group(1) in first_names), None)
    if named:
        return "vlm_names_someone", f"the model's caption names {named.group(1) + named.group(2)!r}"
    return None
