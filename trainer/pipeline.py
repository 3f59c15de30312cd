"""``HiFiPortraitPipeline``: reference photos + prompt + target landmarks -> image.

A diffusers pipeline around the trained parts: the face refiner turns the references (aligned
crops through the CLIP vision encoder, plus identity embeddings) into multi-face tokens; HiFi-Net
(the ControlNet, fed the landmark image and those tokens) steers the frozen SDXL UNet, which reads
the prompt and, through the decoupled face attention, the tokens too. Classifier-free guidance
contrasts that with the empty prompt and zero face tokens, the pair the training dropout taught.

``HiFiPortraitPipeline.from_checkpoint(folder, base=None)`` loads the base from where the trainer
recorded it (or from ``base``) and the trained parts from the checkpoint.
``pipe.save_pretrained(DIR)`` writes a complete pipeline folder (``model_index.json``, every
component, ``face_attention.safetensors`` and ``hifi_portrait.json``), and
``HiFiPortraitPipeline.from_pretrained(DIR, base=None)`` restores it, face attention included, or
fails naming what is missing. From photos::

    reader = FaceReader.from_record(run_faces)                    # the build's face settings
    refs = analyse_photos(reference_photos, reader)                # crops, landmarks, embeddings
    target = driving_landmarks(driving_photo, refs, 1024, reader=reader)  # pose/expression of the driving photo
    image = pipe(prompt, [r.crop_image() for r in refs], [r.embedding for r in refs], landmarks=target).images[0]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel, DiffusionPipeline, ImagePipelineOutput
from diffusers import schedulers as diffusers_schedulers
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import load_file, save_file

from trainer.checkpoint import load_state, resolve_checkpoint
from trainer.components import load_base, vae_scale_factor
from trainer.conditioning import encode_prompts, encode_reference_crops, face_pixels, normalise_clip
from trainer.hifinet import HiFiNet, install_face_attention, processor_key
from portrait.landmarks import render_landmarks
from trainer.refiner import FaceRefiner


def analyse_photos(photos: list[np.ndarray], reader, names: list[str] | None = None) -> list:
    """The subject's face of each photo (HxWx3 uint8 RGB, decoded as the build decodes:
    ``portrait.faces.reader.load_photo``), read as the build read its images: box, landmarks,
    aligned crop (``.crop`` JPEG, ``.crop_image()``) and embedding (``portrait.faces.reader``)."""
    results = []
    for index, photo in enumerate(photos):
        reading = reader.read(photo)
        if reading is None:
            name = names[index] if names else f"photo {index}"
            raise ValueError(f"{name}: no face found by the {reader.backend.name} detector")
        results.append(reading)
    return results


def driving_landmarks(driving: np.ndarray, references: list, size: int, points: int = 68, reader=None) -> np.ndarray:
    """Target landmarks in a size x size output: the driving photo's face retargeted to the
    references' face shape (2D stand-in for the paper's 3D landmark generator; it needs 68
    points, and with a backend that gives only 5 the driving photo's own 5 are used), framed
    like the training crops (the largest square around the face box)."""
    from portrait.faces.geometry import five_from_68
    from portrait.landmarks import retarget_landmarks, square_crop, to_crop

    (face,) = analyse_photos([driving], reader, names=["driving photo"])
    if face.landmarks68 is not None and all(r.landmarks68 is not None for r in references):
        target = retarget_landmarks(face.landmarks68, [r.landmarks68 for r in references])
    elif points == 68:
        raise ValueError("the checkpoint draws 68-point landmarks but the face backend gives only 5 for these photos")
    else:
        target = face.landmarks5
    left, top, side = square_crop(driving.shape[1], driving.shape[0], face.box)
    landmarks = to_crop(target, left, top, side, size)
    return five_from_68(landmarks).astype(np.float32) if points == 5 and len(landmarks) == 68 else landmarks


PIPELINE_FILE = "hifi_portrait.json"
FACE_FILE = "face_attention.safetensors"


def base_folders(state: dict, checkpoint: Path, base: str | Path | None = None, image_encoder: str | Path | None = None) -> tuple[Path, Path]:
    """The base model and image encoder folders a checkpoint was trained on (paths inside the
    run folder are stored relative to it, so a run folder can move); ``base`` / ``image_encoder``
    override them (default encoder with a base override: BASE/image_encoder)."""
    if base is not None:
        return Path(base), Path(image_encoder) if image_encoder else Path(base) / "image_encoder"
    run = checkpoint.parent.parent
    folders = []
    for key in ("base_model", "image_encoder"):
        path = Path(state[key])
        folders.append(path if path.is_absolute() else run / path)
    return folders[0], Path(image_encoder) if image_encoder else folders[1]


class HiFiPortraitPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->face_refiner->controlnet->unet->vae"

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, controlnet, face_refiner, image_encoder, scheduler):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            controlnet=controlnet,
            face_refiner=face_refiner,
            image_encoder=image_encoder,
            scheduler=scheduler,
        )
        self.vae_scale_factor = vae_scale_factor(vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.clip_layer = -2
        self.conditioning_scale = 1.0

    # ------------------------------------------------------------ loading

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
        base: str | Path | None = None, image_encoder: str | Path | None = None,
    ):
        folder = resolve_checkpoint(checkpoint)
        state = load_state(folder)
        model_dir, encoder_dir = base_folders(state, folder, base, image_encoder)
        variant = state["config"]["model"].get("variant") if base is None else None
        vae_dir = state["config"]["model"].get("vae") if base is None else None
        settings = {
            "face_attention": state["face_attention"],
            "clip_layer": state["config"]["refiner"]["clip_layer"],
            "conditioning_scale": state["config"]["hifinet"]["controlnet_conditioning_scale"],
            "landmark_points": state.get("landmark_points", 68),
            "training_resolution": state["config"]["data"]["resolution"],
        }
        return cls._assemble(model_dir, encoder_dir, folder, settings, device, dtype, variant=variant, vae_dir=vae_dir)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
        base: str | Path | None = None, image_encoder: str | Path | None = None, **unused,
    ):
        """A folder written by ``save_pretrained``; ``base`` (a diffusers SDXL folder, its
        image encoder at BASE/image_encoder unless ``image_encoder``) replaces the frozen parts."""
        if unused:
            raise TypeError(f"HiFiPortraitPipeline.from_pretrained takes device, dtype, base, image_encoder; not {sorted(unused)}")
        folder = Path(folder)
        settings_file = folder / PIPELINE_FILE
        if not settings_file.is_file():
            raise FileNotFoundError(f"{folder} is not a HiFiPortraitPipeline folder: no {PIPELINE_FILE} (written by save_pretrained)")
        settings = json.loads(settings_file.read_text())
        model_dir = Path(base) if base else folder
        encoder_dir = Path(image_encoder) if image_encoder else model_dir / "image_encoder"
        return cls._assemble(model_dir, encoder_dir, folder, settings, device, dtype)

    @classmethod
    def _assemble(cls, model_dir, encoder_dir, trained: Path, settings: dict, device, dtype, variant=None, vae_dir=None):
        """The frozen base from ``model_dir``/``encoder_dir``, the trained parts from ``trained``."""
        base = load_base(model_dir, encoder_dir, variant=variant, vae_dir=vae_dir)
        dtype = dtype or torch.float32
        for module in base.frozen_modules().values():
            module.to(device=device, dtype=dtype)
        face = settings["face_attention"]
        if face["processors"]:
            face_file = trained / FACE_FILE
            if not face_file.is_file():
                raise FileNotFoundError(f"{face_file} missing: the model was trained with face attention in {len(face['processors'])} layers")
            processors = install_face_attention(base.unet, face["num_tokens"], face["scale"])
            if sorted(processors) != sorted(face["processors"]):
                raise ValueError(f"{trained}: face attention layers {len(face['processors'])} do not match the base UNet's {len(processors)}")
            modules = torch.nn.ModuleDict({processor_key(k): v for k, v in processors.items()})
            modules.load_state_dict(load_file(face_file), strict=True)
            modules.to(device)
        controlnet = ControlNetModel.from_pretrained(trained / "controlnet", use_safetensors=True).to(device)
        refiner = FaceRefiner.from_pretrained(trained / "face_refiner", use_safetensors=True).to(device)
        scheduler_config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
        scheduler_class = getattr(diffusers_schedulers, scheduler_config.get("_class_name", "EulerDiscreteScheduler"))
        pipe = cls(
            base.vae, base.text_encoder, base.text_encoder_2, base.tokenizer, base.tokenizer_2, base.unet,
            controlnet, refiner, base.image_encoder, scheduler_class.from_config(scheduler_config),
        )
        pipe.clip_layer = settings["clip_layer"]
        pipe.conditioning_scale = settings["conditioning_scale"]
        pipe.landmark_points = settings.get("landmark_points", 68)
        pipe.training_resolution = settings.get("training_resolution")
        return pipe

    def face_settings(self) -> dict:
        processors = self._face_processors()
        first = next(iter(processors.values()), None)
        return {
            "face_attention": {
                "num_tokens": first.num_face_tokens if first else 0,
                "scale": first.scale if first else 0.0,
                "processors": sorted(processors),
            },
            "clip_layer": self.clip_layer,
            "conditioning_scale": self.conditioning_scale,
            "landmark_points": getattr(self, "landmark_points", 68),
            "training_resolution": getattr(self, "training_resolution", None),
        }

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """Every component as diffusers writes them (``model_index.json`` included), plus the face
        attention weights and ``hifi_portrait.json``. The UNet is written with its own attention
        processors, so its folder is a plain SDXL UNet."""
        folder = Path(save_directory)
        processors = dict(self.unet.attn_processors)
        face = self._face_processors()
        settings = self.face_settings()
        self.unet.set_attn_processor(AttnProcessor2_0())
        try:
            super().save_pretrained(folder, safe_serialization=True, **kwargs)
        finally:
            self.unet.set_attn_processor(processors)
        if face:
            weights = {f"{processor_key(n)}.{k}": v.detach().contiguous().cpu() for n, p in face.items() for k, v in p.state_dict().items()}
            save_file(weights, folder / FACE_FILE)
        (folder / PIPELINE_FILE).write_text(json.dumps(settings, indent=1) + "\n")

    def _face_processors(self) -> dict:
        return {name: proc for name, proc in self.unet.attn_processors.items() if hasattr(proc, "to_k_face")}

    def _net(self) -> HiFiNet:
        net = HiFiNet(self.controlnet, self.face_refiner, self._face_processors())
        net.attach_unet(self.unet)
        return net

    # ------------------------------------------------------------ inputs

    def _reference_pixels(self, references) -> torch.Tensor:
        size = self.image_encoder.config.image_size
        if isinstance(references, torch.Tensor):
            pixels = references
        else:
            pixels = torch.from_numpy(np.stack([face_pixels(face, size) for face in references]))
        if pixels.ndim != 4 or pixels.shape[1:] != (3, size, size):
            raise ValueError(f"reference faces must be k crops of 3x{size}x{size}, got {tuple(pixels.shape)}")
        return normalise_clip(pixels)

    def _condition_image(self, landmarks, landmark_image, height: int, width: int) -> torch.Tensor:
        if landmark_image is None:
            if landmarks is None:
                raise ValueError("pass target landmarks (points in output pixels) or a landmark image")
            landmark_image = render_landmarks(np.asarray(landmarks), width, height)
        if isinstance(landmark_image, Image.Image):
            if landmark_image.size != (width, height):
                landmark_image = landmark_image.resize((width, height), Image.BILINEAR)
            array = np.asarray(landmark_image.convert("RGB"), dtype=np.float32) / 255.0
            landmark_image = torch.from_numpy(array.transpose(2, 0, 1).copy())
        if landmark_image.dtype == torch.uint8:
            landmark_image = landmark_image.float() / 255.0
        if landmark_image.ndim == 3:
            landmark_image = landmark_image[None]
        if tuple(landmark_image.shape[-2:]) != (height, width):
            landmark_image = torch.nn.functional.interpolate(landmark_image, size=(height, width), mode="bilinear")
        return landmark_image

    # ------------------------------------------------------------ generation

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        reference_faces,
        reference_embeddings,
        landmarks=None,
        landmark_image=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 5.0,
        negative_prompt: str = "",
        controlnet_conditioning_scale: float | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
    ) -> ImagePipelineOutput:
        """One image. ``reference_faces``: aligned face crops (PIL images, or a [k, 3, S, S]
        tensor: uint8, or float already CLIP-normalised); ``reference_embeddings``: [k, D] identity embeddings from the model
        the training shards used; ``landmarks``: target points in output pixels (or a ready
        ``landmark_image``)."""
        default = self.unet.config.sample_size * self.vae_scale_factor
        height, width = height or default, width or default
        multiple = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
        device = self._execution_device
        dtype = self.unet.dtype
        scale = self.conditioning_scale if controlnet_conditioning_scale is None else controlnet_conditioning_scale
        guided = guidance_scale > 1.0

        condition = self._condition_image(landmarks, landmark_image, height, width).to(device, dtype)
        tokenizers, encoders = (self.tokenizer, self.tokenizer_2), (self.text_encoder, self.text_encoder_2)
        prompt_embeds, pooled = encode_prompts(tokenizers, encoders, [prompt], device)
        pixels = self._reference_pixels(reference_faces).to(device, self.image_encoder.dtype)
        clip_hidden = encode_reference_crops(self.image_encoder, pixels[None], self.clip_layer)
        embeddings = torch.as_tensor(np.asarray(reference_embeddings, dtype=np.float32), device=device)[None]
        net = self._net()
        face_tokens = net.face_tokens(clip_hidden.to(self.face_refiner.dtype), embeddings.to(self.face_refiner.dtype))
        add_time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype)
        if guided:
            neg_embeds, neg_pooled = encode_prompts(tokenizers, encoders, [negative_prompt], device)
            prompt_embeds = torch.cat([neg_embeds, prompt_embeds])
            pooled = torch.cat([neg_pooled, pooled])
            face_tokens = torch.cat([torch.zeros_like(face_tokens), face_tokens])
            add_time_ids = add_time_ids.repeat(2, 1)
            condition = condition.repeat(2, 1, 1, 1)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        shape = (1, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents * self.scheduler.init_noise_sigma
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            with autocast:
                noise = net(
                    model_input.to(dtype),
                    t,
                    prompt_embeds.to(dtype),
                    pooled.to(dtype),
                    add_time_ids,
                    condition,
                    face_tokens=face_tokens.to(dtype),
                    conditioning_scale=scale,
                ).float()
            if guided:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise, t, latents, generator=generator).prev_sample

        if output_type == "latent":
            return ImagePipelineOutput(images=latents)
        vae_dtype = torch.float32 if self.vae.config.force_upcast else self.vae.dtype
        if vae_dtype != self.vae.dtype:
            self.vae.to(vae_dtype)
        image = self.vae.decode(latents.to(vae_dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        images = self.image_processor.postprocess(image.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images)
