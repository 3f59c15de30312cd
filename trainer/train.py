"""Train HiFi-Net and the face refiner on the shards.

    python -m trainer.train --config tiny --shards manifests/demo/shards --output runs/tiny
    accelerate launch --multi_gpu --num_processes 8 -m trainer.train --config sdxl \\
        --model /models/sdxl-base --shards /data/shards --output runs/sdxl

Top to bottom, one run:

1. config (``trainer/configs/<name>.yaml`` + ``--set section.field=value``) and an
   ``accelerate.Accelerator`` (bf16/fp16 autocast on GPU, fp32 on CPU, gloo on CPU, NCCL on GPU).
2. the frozen base from local folders (``tiny`` builds one from a seed into ``OUTPUT/base``),
   HiFi-Net built on it (ControlNet from the UNet, face refiner, face attention), gradient
   checkpointing (ControlNet and frozen UNet switched separately), AdamW (or 8-bit AdamW) over one
   parameter group per trained part (trainer/optim.py), LR warm-up and schedule.
3. the identity stream (``trainer/data.py``), one per process, resampled and split by rank and
   worker so every rank takes the same number of steps.
4. each step: VAE latents of the target (or the precompute cache's, trainer/precompute.py), noise and timestep from a seeded generator, prompt /
   face / joint dropout for classifier-free guidance (IP-Adapter's scheme), the noise-prediction
   MSE, backward (gradient accumulation through ``accelerator.accumulate``), clipping, step.
5. every N steps and at the end: a checkpoint (safetensors + JSON, no pickle), validation on
   held-out identities (face similarity, landmark error, detector misses), logs to the console,
   ``OUTPUT/metrics.jsonl`` and TensorBoard (``OUTPUT/logs``). At the end: ``loss.png`` and
   ``samples.png``.

``--resume latest`` restores weights, optimizer, LR schedule, grad scaler, every rank's RNG and
the data position, so the continued run repeats what an uninterrupted one would have done (on CPU
the loss sequence is identical; tests/test_trainer_train.py checks it). ``--relaxed`` continues
with another process count or loader layout (warned: not exact); ``--init-from CKPT`` takes the
trained weights only. Checkpoints are written by a background thread of the main process
(trainer/checkpoint.py); every collective waits ``train.distributed_timeout_minutes``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from trainer import checkpoint as ckpt
from trainer.config import Config, load_config
from trainer.data import IdentityStream, fixed_examples, in_order, list_shards, make_loader, mix_seed, probe_shards
from trainer.plots import loss_curve, sample_grid
from trainer.usage import FILE_ERRORS, Parser, UsageError, first_line, positive_int, quiet_libraries, run

log = logging.getLogger("trainer.train")
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cast(dtype: torch.dtype) -> dict:
    """``.to()`` arguments: no dtype when it is float32 already (diffusers warns about any cast)."""
    return {} if dtype == torch.float32 else {"dtype": dtype}


def parse_args(argv=None) -> argparse.Namespace:
    parser = Parser(prog="python -m trainer.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny", help="preset name (tiny, sdxl) or a YAML file")
    parser.add_argument("--shards", default="manifests/demo/shards", help="shard folder, glob or brace pattern; may be an object-store URL (s3://bucket/build/shards)")
    parser.add_argument("--output", default=None, help="run folder (default runs/<config name>)")
    parser.add_argument("--model", default=None, help="local diffusers SDXL folder (config sdxl)")
    parser.add_argument("--image-encoder", default=None, help="local CLIP vision folder (default MODEL/image_encoder)")
    parser.add_argument("--max-steps", type=positive_int, default=None, help="override train.max_steps")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder: weights, optimizer, schedule, RNG and data position")
    parser.add_argument("--relaxed", action="store_true", help="with --resume: continue although the process count or loader layout changed (warns what is no longer exact)")
    parser.add_argument("--init-from", default=None, metavar="CKPT", help="start at step 0 from the trained weights of a checkpoint (no optimizer, schedule or data position)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="config override")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: cores left by workers)")
    parser.add_argument("--stop-after", type=positive_int, default=None, help="stop after this step as if interrupted (tests)")
    parser.add_argument("--faces", default=None, help="face settings for validation and inference: a build.json, a recipe or "
                        "a file with a faces: section (default: the build.json beside the shards)")
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = list(args.set)
    if args.model:
        overrides.append(f"model.pretrained={json.dumps(str(args.model))}")
        encoder = args.image_encoder or (Path(args.model) / "image_encoder")
        overrides.append(f"model.image_encoder={json.dumps(str(encoder))}")
    elif args.image_encoder:
        overrides.append(f"model.image_encoder={json.dumps(str(args.image_encoder))}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    return load_config(args.config, overrides)


def condition_dropout(u: torch.Tensor, prompt: float, face: float, joint: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free guidance dropout from uniform draws ``u`` (IP-Adapter's scheme): [0, p)
    drops the prompt, [p, p+f) the face condition, [p+f, p+f+j) both, the rest neither."""
    drop_prompt = (u < prompt) | ((u >= prompt + face) & (u < prompt + face + joint))
    drop_face = (u >= prompt) & (u < prompt + face + joint)
    return drop_prompt, drop_face


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the network learns to predict: the noise (epsilon), or the velocity for a
    v-prediction scheduler (SDXL variants trained so)."""
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "epsilon":
        return noise
    raise ValueError(f"scheduler prediction_type {kind!r} is not supported (epsilon, v_prediction)")


def flat_config(tree: dict, prefix: str = "") -> dict:
    """TensorBoard's hparams take scalars only."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, name + "."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def record_faces(shards, output: Path, main: bool, config: str | None = None) -> dict | None:
    """The face settings of the build that made the shards (``config``, else the build.json
    beside them), kept in the run folder as faces.json so that inference and validation read
    faces as the build did."""
    from portrait.faces.reader import read_config, record, record_for_shards
    from trainer.metrics import FACES_FILE

    faces = record(*read_config(config)) if config else record_for_shards(shards)
    if faces is not None and main:
        (output / FACES_FILE).write_text(json.dumps(faces, indent=1, sort_keys=True) + "\n")
    return faces


class Trainer:
    def __init__(self, cfg: Config, output: Path, shards: str, threads: int | None = None, faces: str | None = None):
        self.cfg = cfg
        self.faces_config = faces
        self.output = Path(output)
        self.shards = shards
        self.threads = threads
        self.step = 0
        self.batches_seen = 0
        self.data_counts: dict[str, int] = {}
        self.shards_read: set[str] = set()
        self.validator = None

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        from datetime import timedelta

        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

        cfg = self.cfg
        on_gpu = torch.cuda.is_available()
        self.mixed_precision = cfg.train.mixed_precision if on_gpu or cfg.train.cpu_mixed_precision else "no"
        if not on_gpu and self.mixed_precision == "fp16":
            raise ValueError("fp16 autocast needs a GPU; use train.mixed_precision=bf16 with cpu_mixed_precision")
        self.accelerator = Accelerator(
            cpu=not on_gpu,
            mixed_precision=self.mixed_precision,
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.output), logging_dir=str(self.output / "logs")),
            # gradients live in DDP's communication buckets instead of a second full copy (1.7B trained params on SDXL)
            kwargs_handlers=[
                DistributedDataParallelKwargs(gradient_as_bucket_view=True),
                # every collective (and the barrier after the main process's validation) waits this long
                InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.train.distributed_timeout_minutes)),
            ],
        )
        acc = self.accelerator
        from accelerate.utils import DistributedType

        # DeepSpeed ZeRO / FSDP shard the optimizer state: checkpoints then hold no optimizer (see save)
        self.sharded_optimizer = acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        if acc.distributed_type == DistributedType.DEEPSPEED:
            # the loader is not prepared by accelerate, so DeepSpeed learns the micro-batch here
            acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
        self.rank, self.world = acc.process_index, acc.num_processes
        self.device = acc.device
        self.weight_dtype = DTYPES[self.mixed_precision]
        if not on_gpu:
            per_process = max(1, (os.cpu_count() or 1) // self.world - cfg.data.num_workers)
            torch.set_num_threads(self.threads or per_process)
        if cfg.model.kind == "sdxl":
            from trainer.components import check_base_folders

            check_base_folders(cfg.model.pretrained, cfg.model.image_encoder)  # before anything is written
        self.output.mkdir(parents=True, exist_ok=True)
        list_shards(self.shards)  # a clear error before any model is built
        self.probe = probe_shards(self.shards)
        self.faces = record_faces(self.shards, self.output, acc.is_main_process, self.faces_config)
        self._setup_models()
        self._setup_optimizer()
        self._setup_data()

    def _base_folders(self) -> tuple[Path, Path]:
        model = self.cfg.model
        if model.kind == "tiny":
            from trainer.architectures import build_tiny_base

            folder = self.output / "base"
            with self.accelerator.main_process_first():
                build_tiny_base(folder, model.tiny_seed)
            return folder, folder / "image_encoder"
        return Path(model.pretrained), Path(model.image_encoder)

    def _setup_models(self) -> None:
        from diffusers import DDPMScheduler

        from trainer.components import load_base, vae_scale_factor
        from trainer.hifinet import build_hifinet, parameter_split

        cfg = self.cfg
        self.base_dir, self.encoder_dir = self._base_folders()
        base = load_base(self.base_dir, self.encoder_dir, variant=cfg.model.variant, vae_dir=cfg.model.vae)
        self.base = base
        torch.manual_seed(cfg.train.seed)
        # the ControlNet copies the UNet's weights before the UNet is cast to the weight dtype
        net = build_hifinet(
            base.unet,
            clip_dim=base.image_encoder.config.hidden_size,
            id_dim=self.probe["embedding_dim"],
            refiner_cfg=cfg.refiner,
            hifinet_cfg=cfg.hifinet,
            vae_factor=vae_scale_factor(base.vae),
            unet_dtype=cast(self.weight_dtype).get("dtype"),
            device=self.device,
        )
        self.vae_dtype = torch.float32 if base.vae.config.force_upcast else self.weight_dtype
        base.vae.to(self.device, **cast(self.vae_dtype))
        for module in (base.text_encoder, base.text_encoder_2, base.image_encoder):
            module.to(self.device, **cast(self.weight_dtype))
        net.controlnet.to(self.device)
        net.refiner.to(self.device)
        if cfg.train.gradient_checkpointing:
            net.controlnet.enable_gradient_checkpointing()
        if cfg.train.unet_gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()  # frozen, but the backward pass runs through it
        self.noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
        self.vae_factor = vae_scale_factor(base.vae)
        self.net = net
        self.split = parameter_split(net, base.frozen_modules())
        if self.accelerator.is_main_process:
            trained = sum(self.split["trained"].values())
            frozen = sum(self.split["frozen"].values())
            log.info("trained parameters %s (%s), frozen %s (%s)", f"{trained:,}", self.split["trained"], f"{frozen:,}", self.split["frozen"])

    def _setup_optimizer(self) -> None:
        from diffusers.optimization import get_scheduler

        from trainer.optim import make_optimizer

        t = self.cfg.train
        optimizer = make_optimizer(self.net, t)
        # stepped once per optimizer step by this loop (not prepared: accelerate would step it once per process)
        self.lr_scheduler = get_scheduler(
            t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps
        )
        self.model, self.optimizer = self.accelerator.prepare(self.net, optimizer)
        self.generator = torch.Generator().manual_seed(mix_seed(t.seed, "noise", self.rank) % 2**63)

    def _setup_data(self) -> None:
        from trainer.precompute import Cache, fingerprint

        d = self.cfg.data
        cache = Cache.find(list_shards(self.shards), d.resolution, fingerprint(self.cfg)) if d.use_cache else None
        self.stream = IdentityStream(
            self.shards,
            resolution=d.resolution,
            clip_size=self.base.image_encoder.config.image_size,
            references=d.references,
            batch_size=d.batch_size,
            batches_per_epoch=d.batches_per_epoch,
            num_workers=d.num_workers,
            seed=self.cfg.train.seed,
            rank=self.rank,
            world_size=self.world,
            examples_per_identity=d.examples_per_identity,
            shuffle_buffer=d.shuffle_buffer,
            holdout_fraction=d.holdout_fraction,
            cache=cache,
        )

    # ------------------------------------------------------------------ one step

    def draw(self, size: int) -> dict:
        """This step's randomness, drawn in a fixed order from this rank's generator: dropout
        choices, timesteps, the VAE posterior sample and the noise."""
        g, d = self.generator, self.cfg.data
        factor = self.vae_factor
        shape = (size, self.base.vae.config.latent_channels, d.resolution // factor, d.resolution // factor)
        return {
            "choice": torch.rand(size, generator=g),
            "timesteps": torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (size,), generator=g),
            "eps": torch.randn(shape, generator=g),
            "noise": torch.randn(shape, generator=g),
        }

    def conditions(self, batch: dict, drop_prompt: torch.Tensor) -> dict:
        """Latent posterior of the target, prompt embeddings and CLIP features of the references:
        from the precompute cache when the batch carries it, else from the frozen encoders."""
        from trainer.conditioning import encode_prompts, encode_reference_crops, model_inputs

        base, device = self.base, self.device
        cached = batch.get("cached")
        if cached is not None:
            keep = (~drop_prompt).to(device)
            return {
                "mean": cached["latent_mean"].to(device).float(),
                "std": cached["latent_std"].to(device).float(),
                # a dropped prompt is the empty one, which SDXL encodes as zeros (as encode_prompts does)
                "prompt_embeds": cached["prompt_embeds"].to(device, self.weight_dtype) * keep[:, None, None].to(self.weight_dtype),
                "pooled": cached["pooled"].to(device, self.weight_dtype) * keep[:, None].to(self.weight_dtype),
                "clip_hidden": cached["clip_hidden"].to(device, self.weight_dtype),
            }
        inputs = model_inputs(batch, device)
        posterior = base.vae.encode(inputs["pixels"].to(self.vae_dtype)).latent_dist
        captions = ["" if drop else caption for caption, drop in zip(batch["captions"], drop_prompt.tolist())]
        prompt_embeds, pooled = encode_prompts(
            (base.tokenizer, base.tokenizer_2), (base.text_encoder, base.text_encoder_2), captions, device
        )
        clip_hidden = encode_reference_crops(
            base.image_encoder, inputs["reference_pixels"].to(self.weight_dtype), self.cfg.refiner.clip_layer
        )
        return {"mean": posterior.mean.float(), "std": posterior.std.float(), "prompt_embeds": prompt_embeds,
                "pooled": pooled, "clip_hidden": clip_hidden}

    def loss(self, batch: dict, draws: dict | None = None) -> torch.Tensor:
        base, t, device = self.base, self.cfg.train, self.device
        draws = draws or self.draw(batch["pixels"].shape[0])
        drop_prompt, drop_face = condition_dropout(draws["choice"], t.prompt_dropout, t.face_dropout, t.joint_dropout)
        with torch.no_grad():
            cond = self.conditions(batch, drop_prompt)
            latents = (cond["mean"] + cond["std"] * draws["eps"].to(device)) * base.vae.config.scaling_factor
            noise = draws["noise"].to(device)
        timesteps = draws["timesteps"].to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = self.model(
            noisy,
            timesteps,
            cond["prompt_embeds"],
            cond["pooled"],
            batch["time_ids"].to(device, self.weight_dtype),
            (batch["landmark_image"].to(device).float() / 255.0).to(self.weight_dtype),
            clip_hidden=cond["clip_hidden"],
            id_embeds=batch["reference_embeddings"].to(device),
            face_keep=(~drop_face).to(device),
            conditioning_scale=self.cfg.hifinet.controlnet_conditioning_scale,
        )
        return F.mse_loss(prediction.float(), diffusion_target(self.noise_scheduler, latents, noise, timesteps).float())

    # ------------------------------------------------------------------ checkpoints

    def _relative(self, path: Path) -> str:
        try:
            return str(Path(path).resolve().relative_to(self.output.resolve()))
        except ValueError:
            return str(Path(path).resolve())

    def state(self) -> dict:
        import accelerate
        import diffusers
        import transformers

        scaler = self.accelerator.scaler
        face_names = [n for n in self.base.unet.attn_processors if hasattr(self.base.unet.attn_processors[n], "to_k_face")]
        return {
            "step": self.step,
            "batches_seen": self.batches_seen,
            "epoch_length": self.stream.epoch_length,
            "world_size": self.world,
            "config": self.cfg.model_dump(),
            "base_model": self._relative(self.base_dir),
            "image_encoder": self._relative(self.encoder_dir),
            "id_dim": self.probe["embedding_dim"],
            "landmark_points": self.probe["landmark_points"],
            "face_attention": {
                "num_tokens": self.cfg.refiner.num_tokens,
                "scale": self.cfg.hifinet.face_attention_scale,
                "processors": face_names,
            },
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "data_counts": self.data_counts,
            "parameters": self.split,
            "versions": {
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
                "accelerate": accelerate.__version__,
            },
        }

    def save(self) -> Path:
        """A checkpoint of this step, written in the background by the main process (see
        trainer/checkpoint.py): the other ranks pass one barrier and write their RNG file."""
        acc = self.accelerator
        self.finish_writing()  # one checkpoint in flight at a time
        tmp = ckpt.checkpoint_root(self.output) / f".tmp-step-{self.step:07d}"
        if acc.is_main_process:
            ckpt.begin(self.output, self.step)
        acc.wait_for_everyone()  # the folder exists for every rank
        ckpt.save_rank_rng(tmp, self.rank, self.generator)
        if acc.is_main_process:
            optimizer = None if self.sharded_optimizer else self.optimizer.optimizer
            snap = ckpt.snapshot(acc.unwrap_model(self.model), optimizer, self.state())
            self.writer = threading.Thread(target=self._write, args=(tmp, snap, self.step), name="checkpoint-writer")
            self.writer.start()
        return ckpt.checkpoint_root(self.output) / f"step-{self.step:07d}"

    def _write(self, tmp: Path, snap: dict, step: int) -> None:
        try:
            ckpt.write_snapshot(tmp, snap)
            ckpt.wait_for_rank_files(tmp, self.world, timeout=60.0 * self.cfg.train.distributed_timeout_minutes)
            final = ckpt.finish(self.output, tmp, step, self.cfg.train.keep_checkpoints)
            log.info("checkpoint %s", final)
        except Exception as exn:  # reported by finish_writing on the training thread
            self.write_error = exn

    def finish_writing(self) -> None:
        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.join()
            self.writer = None
        error, self.write_error = getattr(self, "write_error", None), None
        if error is not None:
            raise RuntimeError(f"writing a checkpoint failed: {error}") from error

    def resume(self, where: str, relaxed: bool = False) -> None:
        try:
            folder = ckpt.resolve_checkpoint(where, self.output)
        except FileNotFoundError:
            if where == "latest":
                log.warning("--resume latest: no checkpoint in %s yet, starting from step 0", self.output)
                return
            raise
        state = ckpt.load_state(folder)
        changed = []
        if state["world_size"] != self.world:
            changed.append(f"{state['world_size']} -> {self.world} processes")
        if state["epoch_length"] != self.stream.epoch_length:
            changed.append(f"{state['epoch_length']} -> {self.stream.epoch_length} batches per epoch (num_workers, batches_per_epoch)")
        if not (folder / "optimizer.safetensors").is_file():
            changed.append("no optimizer state in the checkpoint (written under DeepSpeed/FSDP): AdamW's moments restart")
        if changed and not relaxed:
            raise ValueError(
                f"{folder} cannot continue exactly: {'; '.join(changed)}. Use the same layout, or add --relaxed "
                "to continue anyway, or --init-from to start from its weights"
            )
        self._load_weights(folder)
        if (folder / "optimizer.safetensors").is_file() and not self.sharded_optimizer:
            ckpt.load_optimizer(folder, self.optimizer.optimizer, self.device)
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.step, self.batches_seen = state["step"], state["batches_seen"]
        self.data_counts = dict(state.get("data_counts") or {})
        if changed:
            # a fresh, rank-specific noise stream; the data stream restarts at the same batch count in the new layout
            self.generator.manual_seed(mix_seed(self.cfg.train.seed, "noise", self.rank, "resumed", self.step) % 2**63)
            if self.accelerator.is_main_process:
                log.warning(
                    "--relaxed resume from %s at step %d with %s: weights, optimizer, LR schedule and step continue; "
                    "the data order and the noise differ from an uninterrupted run (not exact)",
                    folder, self.step, "; ".join(changed),
                )
        else:
            ckpt.load_rank_rng(folder, self.rank, self.generator)
        if self.accelerator.is_main_process:
            log.info("resumed from %s at step %d", folder, self.step)

    def init_from(self, where: str) -> None:
        """The trained weights of a checkpoint, nothing else: step 0, fresh optimizer and schedule."""
        folder = ckpt.resolve_checkpoint(where, self.output)
        self._load_weights(folder)
        if self.accelerator.is_main_process:
            log.info("initialised the trained parts from %s (weights only; starting at step 0)", folder)

    def _load_weights(self, folder: Path) -> None:
        try:
            ckpt.load_trained_parts(self.accelerator.unwrap_model(self.model), folder)
        except RuntimeError as exn:  # shape or key mismatch from load_state_dict
            first = str(exn).splitlines()
            raise ValueError(f"{folder}: weights do not fit this config ({' '.join(first[:2])[:300]})") from None

    # ------------------------------------------------------------------ validation

    def pipeline(self):
        from diffusers import schedulers

        from trainer.pipeline import HiFiPortraitPipeline

        base, net = self.base, self.accelerator.unwrap_model(self.model)
        config = json.loads((self.base_dir / "scheduler" / "scheduler_config.json").read_text())
        scheduler = getattr(schedulers, config.get("_class_name", "EulerDiscreteScheduler")).from_config(config)
        pipe = HiFiPortraitPipeline(
            base.vae, base.text_encoder, base.text_encoder_2, base.tokenizer, base.tokenizer_2,
            base.unet, net.controlnet, net.refiner, base.image_encoder, scheduler,
        )
        pipe.clip_layer = self.cfg.refiner.clip_layer
        pipe.conditioning_scale = self.cfg.hifinet.controlnet_conditioning_scale
        return pipe

    def export_pipeline(self, folder: Path) -> Path:
        """The finished model as a complete diffusers pipeline folder (HiFiPortraitPipeline.from_pretrained)."""
        pipe = self.pipeline()
        pipe.landmark_points = self.probe["landmark_points"]
        pipe.training_resolution = self.cfg.data.resolution
        pipe.save_pretrained(folder)
        log.info("pipeline folder %s", folder)
        return folder

    def _examples(self, heldout: bool | None) -> list[dict]:
        d = self.cfg.data
        return fixed_examples(
            self.shards,
            self.cfg.train.val_identities,
            references=d.references,
            resolution=d.resolution,
            clip_size=self.base.image_encoder.config.image_size,
            holdout_fraction=d.holdout_fraction,
            heldout=heldout,
            seed=self.cfg.train.seed,
        )

    def validate(self) -> tuple[dict | None, list]:
        """Main process only. Returns (metrics, images)."""
        from trainer.validate import Validator

        t = self.cfg.train
        if t.val_identities == 0:
            return None, []
        if self.validator is None:
            examples = self._examples(heldout=True)
            if not examples:
                log.warning(
                    "validation: no held-out identity in the shards (holdout_fraction %.3f); nothing to validate",
                    self.cfg.data.holdout_fraction,
                )
            self.validator = Validator(examples, t.val_inference_steps, t.val_guidance_scale, seed=t.seed, faces=self.faces)
        if not self.validator.examples:
            return None, []
        started = time.time()
        images = self.validator.generate(self.pipeline())
        metrics = self.validator.measure(images)
        metrics["seconds"] = round(time.time() - started, 2)
        log.info("validation at step %d on %d held-out identities: %s", self.step, len(images), metrics)
        numeric = {f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
        self.accelerator.log(numeric, step=self.step)
        self._append_metrics({"step": self.step, "validation": metrics})
        return metrics, images

    # ------------------------------------------------------------------ logging

    def _trim_metrics(self) -> None:
        """Keep the logged rows up to the step this run starts from: a fresh run starts an empty
        log, a resumed one drops what an interrupted run logged after its last checkpoint."""
        path = self.output / "metrics.jsonl"
        if not path.is_file():
            return
        if self.step == 0 and any(ckpt.checkpoint_root(self.output).glob("step-*")):
            log.warning("%s holds an earlier run; starting again from step 0 (--resume latest continues it)", self.output)
        rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= self.step]
        path.write_text("".join(line + "\n" for line in rows))

    def _append_metrics(self, row: dict) -> None:
        with open(self.output / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")

    def _note_batch(self, batch: dict) -> None:
        for reason, count in batch["stats"].items():
            self.data_counts[reason] = self.data_counts.get(reason, 0) + count
        self.shards_read.update(batch["shards"])

    def _write_rank_file(self, finished: bool, digest: str) -> None:
        folder = self.output / "ranks"
        folder.mkdir(exist_ok=True)
        (folder / f"rank{self.rank}.json").write_text(
            json.dumps(
                {
                    "rank": self.rank,
                    "world_size": self.world,
                    "steps": self.step,
                    "batches_seen": self.batches_seen,
                    "finished": finished,
                    "shards_read": sorted(self.shards_read),
                    "data_counts": self.data_counts,
                    "parameter_digest": digest,
                },
                indent=1,
            )
            + "\n"
        )

    def parameter_digest(self) -> str:
        """sha256 of the trained parameters: equal on every rank while DDP keeps them in sync."""
        digest = hashlib.sha256()
        for name, value in sorted(self.accelerator.unwrap_model(self.model).state_dict().items()):
            digest.update(name.encode())
            digest.update(value.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()

    def _check_ranks_agree(self, digest: str) -> None:
        """Ranks whose trained weights differ have stopped synchronising gradients: say so loudly."""
        from accelerate.utils import gather_object

        digests = gather_object([digest]) if self.world > 1 else [digest]
        if len(set(digests)) > 1 and self.accelerator.is_main_process:
            log.error("trained parameters differ between ranks (digests %s): gradients were not synchronised", digests)

    def _report_upsampling(self) -> None:
        upsampled = self.data_counts.get("upsampled_target", 0)
        if upsampled and self.accelerator.is_main_process:
            examples = self.batches_seen * self.cfg.data.batch_size
            log.warning(
                "%d of ~%d targets on rank 0 were upsampled to %d px (their face crop is smaller): store "
                "images with the short side >= the training resolution (shard stage resize: short_side)",
                upsampled, examples, self.cfg.data.resolution,
            )

    # ------------------------------------------------------------------ the loop

    def train(self, stop_after: int | None = None) -> dict:
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():  # log lines print above the progress bar, not inside it
            return self._train(stop_after)

    def _train(self, stop_after: int | None) -> dict:
        from tqdm.auto import tqdm

        acc, t = self.accelerator, self.cfg.train
        if acc.is_main_process:
            self._trim_metrics()
            acc.init_trackers("hifi-portrait", config=flat_config(self.cfg.model_dump()))
            (self.output / "trainer_config.json").write_text(json.dumps(self.cfg.model_dump(), indent=1) + "\n")
        loader = make_loader(self.stream, pin_memory=torch.cuda.is_available(), seed=t.seed)
        self.bar = tqdm(total=t.max_steps, initial=self.step, disable=not acc.is_main_process, desc="train", unit="step")
        self.window, self.tick, self.last_saved = [], time.time(), None
        micro_losses = []
        self.model.train()
        while self.step < t.max_steps and not self._stopping(stop_after):
            epoch, done = divmod(self.batches_seen, self.stream.epoch_length)
            self.stream.set_position(epoch, done)
            for batch in in_order(loader, done):
                micro_losses.append(self._micro_step(batch))
                if not acc.sync_gradients:
                    continue  # accumulating: no optimizer step yet
                self.lr_scheduler.step()
                self.step += 1
                self._log_step(acc.reduce(torch.stack(micro_losses).mean(), reduction="mean").item(), epoch)
                micro_losses = []
                self._checkpoint_and_validate(stop_after)
                if self.step >= t.max_steps or self._stopping(stop_after):
                    break
        self.bar.close()
        if self.last_saved != self.step:
            self.save()
        self.finish_writing()
        finished = self.step >= t.max_steps
        digest = self.parameter_digest()
        self._write_rank_file(finished, digest)
        self._check_ranks_agree(digest)
        self._report_upsampling()
        summary = {"step": self.step, "finished": finished, "data_counts": self.data_counts}
        if finished and acc.is_main_process:
            summary.update(self._final_outputs())
        acc.wait_for_everyone()
        acc.end_training()
        return summary

    def _stopping(self, stop_after: int | None) -> bool:
        return stop_after is not None and self.step >= stop_after

    def _micro_step(self, batch: dict) -> torch.Tensor:
        """Forward and backward of one loader batch; the optimizer steps when accumulation syncs."""
        acc, t = self.accelerator, self.cfg.train
        self.batches_seen += 1
        self._note_batch(batch)
        with acc.accumulate(self.model):
            loss = self.loss(batch)
            acc.backward(loss)
            if acc.sync_gradients and t.max_grad_norm > 0:
                acc.clip_grad_norm_(self.model.parameters(), t.max_grad_norm)
            self.optimizer.step()  # a no-op while accumulating (accelerate's optimizer wrapper)
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def _log_step(self, loss: float, epoch: int) -> None:
        acc, t = self.accelerator, self.cfg.train
        lr = self.lr_scheduler.get_last_lr()[0]
        self.window.append(loss)
        if not acc.is_main_process:
            return
        self._append_metrics({"step": self.step, "loss": loss, "lr": lr, "epoch": epoch})
        acc.log({"train/loss": loss, "train/lr": lr}, step=self.step)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}")
        if self.step % t.log_every == 0:
            seconds = (time.time() - self.tick) / len(self.window)
            log.info(
                "step %d/%d loss %.4f lr %.2e %.2fs/step data %s",
                self.step, t.max_steps, sum(self.window) / len(self.window), lr, seconds, self.data_counts or "clean",
            )
            self.window, self.tick = [], time.time()

    def _checkpoint_and_validate(self, stop_after: int | None) -> None:
        t, stopping = self.cfg.train, self._stopping(stop_after)
        if self.step % t.checkpoint_every == 0 or self.step == t.max_steps or stopping:
            self.save()
            self.last_saved = self.step
        if self.step % t.validate_every == 0 and self.step < t.max_steps and not stopping:
            if self.accelerator.is_main_process:
                self.validate()
            self.accelerator.wait_for_everyone()

    def _final_outputs(self) -> dict:
        metrics, images = self.validate()
        out = {"validation": metrics, "loss_curve": str(loss_curve(self.output / "metrics.jsonl", self.output / "loss.png"))}
        if self.cfg.train.export_pipeline:
            out["pipeline"] = str(self.export_pipeline(self.output / "pipeline"))
        examples = self.validator.examples if self.validator and self.validator.examples else []
        if self.cfg.train.val_identities == 0:
            log.info("train.val_identities is 0: no validation and no sample grid")
        elif not examples:
            from trainer.validate import Validator

            log.info("sample grid: no held-out identity, using the first identities of the shards")
            examples = self._examples(heldout=None)
            if examples:
                images = Validator(examples, self.cfg.train.val_inference_steps, self.cfg.train.val_guidance_scale).generate(self.pipeline())
        if examples:
            grid = sample_grid(examples, images, self.output / "samples.png")
            out["sample_grid"] = str(grid)
            tracker = self.accelerator.get_tracker("tensorboard", unwrap=True)
            if hasattr(tracker, "add_image"):
                from PIL import Image

                tracker.add_image("samples", np.asarray(Image.open(grid).convert("RGB")), self.step, dataformats="HWC")
        (self.output / "summary.json").write_text(json.dumps({**out, "step": self.step, "data_counts": self.data_counts}, indent=1) + "\n")
        log.info("wrote %s", ", ".join(v for k, v in out.items() if k != "validation"))
        return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    quiet_libraries()
    logging.basicConfig(
        level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        cfg = resolve_config(args)
    except ValidationError as exn:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exn.errors())
        raise UsageError(f"config: {problems}") from None
    except (ValueError, FileNotFoundError) as exn:
        raise UsageError(f"config: {exn}") from None
    output = Path(args.output or f"runs/{cfg.name}")
    trainer = Trainer(cfg, output, args.shards, threads=args.threads, faces=args.faces)
    try:
        trainer.setup()
        if args.resume and args.init_from:
            raise ValueError("--resume and --init-from exclude each other")
        if args.relaxed and not args.resume:
            raise ValueError("--relaxed goes with --resume")
        if args.resume:
            trainer.resume(args.resume, relaxed=args.relaxed)
        elif args.init_from:
            trainer.init_from(args.init_from)
    except FILE_ERRORS as exn:  # missing or damaged shards, model folders, checkpoints
        raise UsageError(first_line(exn)) from None
    return trainer.train(stop_after=args.stop_after)


if __name__ == "__main__":
    sys.exit(run(main))
