"""Precompute what the frozen encoders give for every sample, beside the shards.

    python -m trainer.precompute --config sdxl --model /models/sdxl --shards /data/shards
    python -m trainer.precompute --config tiny --shards manifests/demo/shards

For each sample of each shard ``DIR/shard-NNNNN.tar`` it stores, in
``DIR/shard-NNNNN.cache-<resolution>.safetensors``:

- ``KEY.latent_mean`` / ``KEY.latent_std``: the VAE posterior of the sample's target crop (the
  square around the face at the training resolution, ``trainer.data.target_crop``; deterministic),
  float32. Training samples the latent from them with its own seeded noise, as without the cache.
- ``KEY.prompt_embeds`` / ``KEY.pooled``: SDXL's text embeddings of the caption.
- ``KEY.clip_hidden``: the CLIP vision hidden states (``refiner.clip_layer``) of the face crop,
  what the sample contributes when it serves as a reference.

Streamed (one shard at a time, ``--batch-size`` samples per forward pass) and resumable: a shard
file is written under a temporary name and renamed when complete; a rerun skips shards whose file
is there with the same fingerprint (base model, VAE, image encoder, resolution, CLIP layer).
Training (``trainer.train``) uses a shard's file when present and matching, and the encoders
otherwise; a batch with any uncached example uses the encoders for the whole batch. Several GPUs:
``accelerate launch --num_processes 8 -m trainer.precompute ...``: process R takes shards R, R+8, ...

Sizes at 1024 px (SDXL, bf16 text and CLIP features): ~0.5 MB latents + ~0.3 MB text + ~0.65 MB
CLIP per sample, ~1.5 MB (about 6x the JPEG). Local shard folders only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trainer.usage import FILE_ERRORS, Parser, UsageError, first_line, positive_int, quiet_libraries, run

from trainer.data import CorruptSample, Stats, _sequential_records, decode_image, list_shards, target_crop

log = logging.getLogger("trainer.precompute")
FIELDS = ("latent_mean", "latent_std", "prompt_embeds", "pooled", "clip_hidden")


def cache_path(shard_url: str, resolution: int) -> Path:
    path = Path(shard_url)
    return path.with_name(f"{path.stem}.cache-{resolution}.safetensors")


def fingerprint(cfg, base_dir: Path | None = None) -> str:
    """What the cached tensors depend on besides the shard's bytes."""
    m = cfg.model
    base = f"tiny:{m.tiny_seed}" if m.kind == "tiny" else str(Path(m.pretrained).resolve())
    return json.dumps(
        {
            "base": base,
            "variant": m.variant,
            "vae": str(Path(m.vae).resolve()) if m.vae else None,
            "image_encoder": None if m.kind == "tiny" else str(Path(m.image_encoder).resolve()),
            "resolution": cfg.data.resolution,
            "clip_layer": cfg.refiner.clip_layer,
        },
        sort_keys=True,
    )


def _file_fingerprint(path: Path) -> str | None:
    try:
        with safe_open(path, framework="pt") as handle:
            return (handle.metadata() or {}).get("fingerprint")
    except Exception:  # a truncated or foreign file is not a cache
        return None


class Cache:
    """Lookup of cached tensors for the loader workers (picklable: files open lazily per process)."""

    def __init__(self, files: dict[str, Path]):
        self.files = files  # shard file name -> cache file
        self._handles: dict[str, tuple] = {}  # shard -> (open file, its key set), per process

    @classmethod
    def find(cls, urls: list[str], resolution: int, expected: str) -> "Cache | None":
        files = {}
        for url in urls:
            if "://" in url:
                continue
            path = cache_path(url, resolution)
            if path.is_file() and _file_fingerprint(path) == expected:
                files[Path(url).name] = path
        if not files:
            return None
        log.info("precompute cache: %d of %d shard(s) cached", len(files), len(urls))
        return cls(files)

    def __getstate__(self):
        return {"files": self.files, "_handles": {}}

    def _handle(self, shard: str) -> tuple:
        if shard not in self._handles:
            handle = safe_open(self.files[shard], framework="pt")
            self._handles[shard] = (handle, set(handle.keys()))
        return self._handles[shard]

    def example(self, target, references) -> dict | None:
        """The target's latents and text features and the references' CLIP features, or None
        when a sample is not cached."""
        if target.shard not in self.files:
            return None
        handle, keys = self._handle(target.shard)
        wanted = [f"{target.key}.{f}" for f in FIELDS[:4]] + [f"{r.key}.clip_hidden" for r in references]
        if not all(k in keys for k in wanted) or any(r.shard != target.shard for r in references):
            return None
        out = {f: handle.get_tensor(f"{target.key}.{f}") for f in FIELDS[:4]}
        out["clip_hidden"] = torch.stack([handle.get_tensor(f"{r.key}.clip_hidden") for r in references])
        return out


@torch.no_grad()
def encode_records(trainer, records: list) -> dict[str, torch.Tensor]:
    """The cached tensors of ``records`` through the trainer's frozen encoders, in its dtypes."""
    from trainer.conditioning import encode_prompts, encode_reference_crops, face_pixels, model_inputs

    base, device, cfg = trainer.base, trainer.device, trainer.cfg
    pixels = torch.from_numpy(np.stack([target_crop(r, cfg.data.resolution)[2] for r in records]))
    size = base.image_encoder.config.image_size
    faces = torch.from_numpy(
        np.stack([face_pixels(decode_image(r.face, f"{r.key}.face.jpg"), size) for r in records])
    )
    inputs = model_inputs({"pixels": pixels, "landmark_image": pixels, "reference_pixels": faces[:, None]}, device)
    posterior = base.vae.encode(inputs["pixels"].to(trainer.vae_dtype)).latent_dist
    captions = [str(r.meta.get("caption") or "") for r in records]
    prompt_embeds, pooled = encode_prompts((base.tokenizer, base.tokenizer_2), (base.text_encoder, base.text_encoder_2), captions, device)
    clip = encode_reference_crops(base.image_encoder, inputs["reference_pixels"].to(trainer.weight_dtype), cfg.refiner.clip_layer)
    out = {}
    for index, record in enumerate(records):
        values = (posterior.mean[index].float(), posterior.std[index].float(), prompt_embeds[index], pooled[index], clip[index, 0])
        for field, value in zip(FIELDS, values):
            out[f"{record.key}.{field}"] = value.detach().to("cpu").contiguous()
    return out


def precompute_shard(trainer, url: str, expected: str, batch_size: int) -> str:
    """Cache one shard; returns "cached", "skipped" (already there) or "failed"."""
    target = cache_path(url, trainer.cfg.data.resolution)
    if target.is_file() and _file_fingerprint(target) == expected:
        return "skipped"
    stats = Stats()
    tensors: dict[str, torch.Tensor] = {}
    pending: list = []
    for record in _sequential_records([url], stats):
        pending.append(record)
        if len(pending) == batch_size:
            tensors.update(_encode_each_good(trainer, pending, stats))
            pending = []
    if pending:
        tensors.update(_encode_each_good(trainer, pending, stats))
    if not tensors:
        log.warning("%s: no sample could be encoded (%s)", url, stats.counts)
        return "failed"
    tmp = target.with_name(target.name + ".tmp")
    save_file(tensors, tmp, metadata={"fingerprint": expected})
    os.replace(tmp, target)
    if stats.counts:
        log.warning("%s: samples left out of the cache: %s (training encodes them)", url, stats.counts)
    return "cached"


def _encode_each_good(trainer, records: list, stats: Stats) -> dict:
    try:
        return encode_records(trainer, records)
    except CorruptSample:  # find the bad one(s); the rest are cached
        out = {}
        for record in records:
            try:
                out.update(encode_records(trainer, [record]))
            except CorruptSample as exn:
                stats.count("undecodable_image", str(exn), key=record.key)
        return out


def main(argv=None) -> dict:
    from trainer.train import Trainer, resolve_config

    parser = Parser(prog="python -m trainer.precompute", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--shards", default="manifests/demo/shards")
    parser.add_argument("--model", default=None)
    parser.add_argument("--image-encoder", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--threads", type=positive_int, default=None)
    args = parser.parse_args(argv)
    args.max_steps = None
    quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        cfg = resolve_config(args)
        urls = list_shards(args.shards)
    except (ValueError, FileNotFoundError) as exn:
        raise UsageError(str(exn)) from None
    remote = [u for u in urls if "://" in u]
    if remote:
        raise UsageError(f"the precompute cache is written beside local shards; {remote[0]} is remote")
    with tempfile.TemporaryDirectory(prefix="precompute-") as scratch:
        trainer = Trainer(cfg, Path(scratch), args.shards, threads=args.threads)
        try:
            trainer.setup()  # the frozen encoders exactly as training builds them
        except FILE_ERRORS as exn:  # missing or damaged shards or model folders
            raise UsageError(first_line(exn)) from None
        expected = fingerprint(cfg)
        counts: dict[str, int] = {}
        mine = urls[trainer.rank :: trainer.world]  # launched on several GPUs: disjoint shares, no collectives
        for index, url in enumerate(mine):
            outcome = precompute_shard(trainer, url, expected, args.batch_size)
            counts[outcome] = counts.get(outcome, 0) + 1
            log.info("%d/%d %s: %s", index + 1, len(mine), Path(url).name, outcome)
    log.info("precompute: %s", counts)
    return counts


if __name__ == "__main__":
    sys.exit(run(main))
