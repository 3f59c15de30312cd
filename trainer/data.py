"""Training examples streamed from the WebDataset shards that datakit's shard stage writes.

A shard ``shard-NNNNN.tar`` holds samples grouped by identity (an identity never spans two
shards). The sample is defined once, in ``portrait.sample``, for the shard stage that writes it,
``datakit verify`` and this reader: ``K.jpg`` (the image), ``K.face.jpg`` (aligned face crop),
``K.json`` (identity_id, caption, box, ...), ``K.embedding.npy`` (float32 [D]) and
``K.landmarks.npy`` (float32 [68, 2] or [5, 2]), coordinates in the stored image's pixels.

Per process and loader worker, top to bottom:

1. shards: split by node (rank) and then by worker (``urls[rank::world][worker::workers]``,
   the same rule as ``webdataset.split_by_node`` / ``split_by_worker``), then resampled with
   replacement from that subset (``webdataset.ResampledShards``, seeded) so a stream never runs
   dry and every rank takes the same number of steps. Fewer shards than ranks x workers cannot
   be split disjointly: that is detected up front, warned about, and the ranks or workers that
   would get nothing resample from the shared list instead of hanging.
2. samples (``webdataset.tarfile_to_samples``): an unreadable tar is counted and skipped.
3. parse (``portrait.sample.parse``): members, JSON fields and .npy arrays are checked (pickle
   refused); a sample that fails is counted and skipped with a warning naming its key, its shard
   and what is wrong (``datakit verify`` reports the same samples as ``invalid_sample``).
4. identity groups: consecutive samples of one identity in one read of a shard. Held-out identities (a
   stable hash of identity_id under ``holdout_fraction``) are reserved for validation; groups
   smaller than 1 + k are counted and skipped.
5. examples: each visit of an identity gives ``examples_per_identity`` examples whatever its size
   (so large clusters do not dominate): 1 target + k distinct references, drawn with a seeded
   ``random.Random`` (seed, epoch, rank, worker).
6. a seeded shuffle buffer (``webdataset.shuffle``), batches, then decoding: the target is cropped
   to a square around the face and resized to the training resolution, its landmarks are moved
   into that crop and rendered as the condition image; the caption is the prompt; the references'
   face crops are resized for the CLIP vision encoder. Images leave the workers as uint8
   (``trainer.conditioning.model_inputs`` normalises them on the training device). An image that fails to
   decode drops its example (counted); its slot is filled with a copy of another example of the
   same batch, so batches keep their size.
7. ``with_epoch``: each worker yields exactly ``ceil(batches_per_epoch / workers)`` batches.

Resuming: the stream of a worker depends only on (seed, epoch, rank, worker), so a run that
restarts at batch c of an epoch asks each worker to skip its share of the first c batches. The
skip happens before decoding (it costs reading the tars, not decoding images), and counters
are reset after it so skipped batches are not counted twice. (Exact as long as no batch is
entirely undecodable; such a batch is replaced by the next one.)
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import math
import random
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.gopen import gopen_schemes

from trainer.conditioning import face_pixels, time_ids
from portrait.landmarks import render_landmarks, square_crop, to_crop
from portrait.sample import SampleError
from portrait.sample import parse as parse_members

log = logging.getLogger("trainer.data")

MAX_PIXELS = 4096 * 4096  # stored images are at most 1024 on the long side; anything larger is wrong


class CorruptSample(ValueError):
    """A sample that cannot be used; the message names the key, the shard and what is wrong."""


@dataclass
class Record:
    key: str
    shard: str
    identity_id: str
    meta: dict
    image: bytes
    face: bytes
    embedding: np.ndarray
    landmarks: np.ndarray


@dataclass
class Stats:
    """Per-worker counters; batches carry what changed since the previous batch."""

    counts: dict = field(default_factory=dict)
    shards: list = field(default_factory=list)
    shards_without_example: int = 0
    reported: set = field(default_factory=set)

    def count(self, reason: str, message: str | None = None, key: str | None = None) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if message and key not in self.reported:
            self.reported.add(key)
            log.warning("%s (skipped, counted as %s)", message, reason)

    def tar_error(self, exn: Exception) -> bool:
        """webdataset handler: an unreadable shard or tar member is counted and skipped."""
        self.count("unreadable_shard", f"unreadable shard data: {exn}", key=repr(exn.args[:1]))
        return True

    def take(self) -> tuple[dict, list]:
        counts, shards = self.counts, self.shards
        self.counts, self.shards = {}, []
        return counts, shards


# ---------------------------------------------------------------- shards


# Object-store URLs are read through fsspec (webdataset's own table covers file, pipe:, http(s)
# via curl, gs via gsutil). Options such as an S3 endpoint come from fsspec's configuration:
# FSSPEC_S3_ENDPOINT_URL, FSSPEC_S3_KEY, ... or the backend's (AWS_* variables, ~/.aws).
FSSPEC_SCHEMES = ("s3", "s3a", "gcs", "az", "abfs", "memory")


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_):
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs.open(path, mode, block_size=max(bufsize, 8 << 20))  # few large range reads


for _scheme in FSSPEC_SCHEMES:
    gopen_schemes.setdefault(_scheme, _gopen_fsspec)


def _list_object_store(spec: str) -> list[str] | None:
    """Shard URLs under an fsspec folder URL or glob, or None when ``spec`` is not such a URL."""
    if spec.split("://", 1)[0] not in FSSPEC_SCHEMES:
        return None
    import fsspec

    fs, path = fsspec.core.url_to_fs(spec)
    protocol = spec.split("://", 1)[0]
    if any(c in path for c in "*?["):
        found = fs.glob(path)
    elif fs.isdir(path):
        found = fs.glob(path.rstrip("/") + "/*.tar")
    else:
        found = [path] if fs.exists(path) else []
    return sorted(f"{protocol}://{p}" for p in found)


def list_shards(spec: str | Path | list) -> list[str]:
    """Shard paths from a folder (its ``*.tar``, sorted), a glob, a brace pattern or a list;
    folders and globs may be object-store URLs (``s3://bucket/corpus/shards``)."""
    if isinstance(spec, (list, tuple)):
        urls = [str(s) for s in spec]
    elif (listed := _list_object_store(str(spec))) is not None:
        urls = listed
    else:
        spec = str(spec)
        path = Path(spec)
        if path.is_dir():
            urls = sorted(str(p) for p in path.glob("*.tar"))
        elif any(c in spec for c in "*?["):
            urls = sorted(glob.glob(spec))
        elif "{" in spec:
            urls = list(wds.shardlists.expand_urls(spec))
        else:
            urls = [spec]
    missing = [u for u in urls if "://" not in u and not Path(u).is_file()]
    if not urls or missing:
        where = f"missing: {', '.join(missing[:3])}" if missing else "no .tar files"
        raise FileNotFoundError(f"no shards at {spec!r} ({where}); build them first (make demo)")
    return urls


def shard_plan(num_shards: int, world_size: int, num_workers: int) -> list[str]:
    """Warnings for shard counts that cannot give every rank and worker a disjoint share."""
    notes = []
    workers = max(1, num_workers)
    if num_shards < world_size:
        notes.append(
            f"{num_shards} shard(s) for {world_size} ranks: ranks cannot read disjoint shards; "
            "every rank resamples from all shards (build more shards: at least ranks x workers)"
        )
    elif num_shards < world_size * workers:
        notes.append(
            f"{num_shards} shard(s) for {world_size} rank(s) x {workers} worker(s): workers of a rank "
            "share its shards and resample them with different seeds (build at least ranks x workers shards)"
        )
    return notes


def assign_shards(urls: list[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """Split by node, then by worker; a share that would be empty falls back to the wider list."""
    rank_urls = urls[rank::world_size] if len(urls) >= world_size else list(urls)
    workers = max(1, num_workers)
    return rank_urls[worker::workers] if len(rank_urls) >= workers else rank_urls


def mix_seed(*parts: int | str) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def is_heldout(identity_id: str, fraction: float) -> bool:
    """Stable split: an identity is held out for validation when its hash falls under fraction."""
    if fraction <= 0:
        return False
    value = int(hashlib.sha1(identity_id.encode()).hexdigest()[:8], 16) / 16**8
    return value < fraction


# ---------------------------------------------------------------- parsing


def parse_sample(sample: dict) -> Record:
    """A WebDataset sample (``__key__``, ``__url__`` and one entry per member) as a Record."""
    key = sample.get("__key__", "?")
    shard = Path(str(sample.get("__url__", "?"))).name
    members = {name: data for name, data in sample.items() if not name.startswith("__")}
    try:
        parsed = parse_members(key, members)
    except SampleError as exn:
        raise CorruptSample(f"sample {key} in {shard}: {exn}") from None
    return Record(
        key=key,
        shard=shard,
        identity_id=parsed.identity_id,
        meta=parsed.meta,
        image=parsed.image,
        face=parsed.face,
        embedding=parsed.embedding,
        landmarks=parsed.landmarks,
    )


def _parse_records(samples, stats: Stats):
    for sample in samples:
        try:
            yield parse_sample(sample)
        except CorruptSample as exn:
            stats.count("corrupt_sample", str(exn), key=f"{sample.get('__url__')}/{sample.get('__key__')}")


def _identity_groups(records, stats: Stats, min_size: int, holdout_fraction: float, heldout: bool | None):
    """Consecutive records of one identity in one shard. ``heldout``: True keeps only held-out
    identities, False only training ones, None both."""

    def finish(group):
        if heldout is not None and is_heldout(group[0].identity_id, holdout_fraction) != heldout:
            return  # the other split's identity: not an error, not counted
        if len(group) < min_size:
            stats.count("identity_too_small")
        else:
            yield group

    group: list[Record] = []
    keys: set[str] = set()
    for record in records:
        # a key seen again means the same shard was drawn twice in a row: a new read, a new group
        if group and (record.identity_id != group[0].identity_id or record.shard != group[0].shard or record.key in keys):
            yield from finish(group)
            group, keys = [], set()
        group.append(record)
        keys.add(record.key)
    if group:
        yield from finish(group)


@dataclass
class ExampleSpec:
    target: Record
    references: list[Record]


def choose_example(group: list[Record], references: int, rng: random.Random) -> ExampleSpec:
    target = rng.randrange(len(group))
    others = [i for i in range(len(group)) if i != target]
    return ExampleSpec(group[target], [group[i] for i in rng.sample(others, references)])


def _examples(groups, rng: random.Random, references: int, per_identity: int, stats: Stats):
    for group in groups:
        for _ in range(per_identity):
            stats.shards_without_example = 0
            yield choose_example(group, references, rng)


def _note_shards(sources, stats: Stats, limit: int):
    for source in sources:
        if stats.shards_without_example >= limit:
            raise RuntimeError(
                f"{limit} shard reads in a row gave no training example: every identity in "
                f"{Path(source['url']).parent} is held out, has fewer than 1 + k samples, or is corrupt "
                f"(counts so far: {stats.counts})"
            )
        stats.shards_without_example += 1
        stats.shards.append(Path(source["url"]).name)
        yield source


def _batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []


# ---------------------------------------------------------------- decoding


def decode_image(data: bytes, what: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_PIXELS:
            raise CorruptSample(f"{what} has {image.width}x{image.height} pixels, more than {MAX_PIXELS}")
        image.load()
        return image.convert("RGB")
    except CorruptSample:
        raise
    except Exception as exn:
        raise CorruptSample(f"{what} does not decode ({exn})") from None


def target_crop(target: Record, resolution: int) -> tuple[Image.Image, tuple[int, int, int], np.ndarray]:
    """The decoded image, its square crop around the face (left, top, side) and the crop resized
    to the training resolution (uint8 CHW): the VAE's input, here and in the precompute pass."""
    image = decode_image(target.image, f"sample {target.key} in {target.shard}: {target.key}.jpg")
    box = target.meta["box"]
    left, top, side = square_crop(image.width, image.height, box)
    crop = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    return image, (left, top, side), np.asarray(crop, dtype=np.uint8).transpose(2, 0, 1).copy()


def decode_example(spec: ExampleSpec, resolution: int, clip_size: int, cache=None) -> dict:
    """Decoded arrays of one example (see the module docstring); with a precompute ``cache``
    (trainer/precompute.py) also the cached latents and features under ``cached``."""
    target = spec.target
    image, (left, top, side), pixels = target_crop(target, resolution)
    landmarks = to_crop(target.landmarks, left, top, side, resolution)
    condition = np.asarray(render_landmarks(landmarks, resolution), dtype=np.uint8).transpose(2, 0, 1).copy()
    faces = []
    for ref in spec.references:
        face = decode_image(ref.face, f"sample {ref.key} in {ref.shard}: {ref.key}.face.jpg")
        faces.append(face_pixels(face, clip_size))
    scale = resolution / side
    example = {
        "pixels": pixels,
        "landmark_image": condition,
        "landmarks": landmarks,
        "reference_pixels": np.stack(faces),
        "reference_embeddings": np.stack([r.embedding for r in spec.references]),
        "time_ids": np.array(
            time_ids((image.height, image.width), (top * scale, left * scale), (resolution, resolution)),
            dtype=np.float32,
        ),
        "caption": str(target.meta.get("caption") or ""),
        "identity_id": target.identity_id,
        "key": target.key,
        "reference_keys": [r.key for r in spec.references],
        # the face crop is smaller than the training resolution: scaled up, never silently (counted)
        "upsampled": side < resolution,
    }
    if cache is not None and (cached := cache.example(target, spec.references)) is not None:
        example["cached"] = cached
    return example


def collate(examples: list[dict]) -> dict:
    batch = {
        name: torch.from_numpy(np.stack([e[name] for e in examples]))
        for name in ("pixels", "landmark_image", "reference_pixels", "reference_embeddings", "time_ids")
    }
    for name in ("caption", "identity_id", "key", "landmarks", "reference_keys"):
        batch[name + "s" if not name.endswith("s") else name] = [e[name] for e in examples]
    if all("cached" in e for e in examples):
        batch["cached"] = {k: torch.stack([e["cached"][k] for e in examples]) for k in examples[0]["cached"]}
    return batch


def _skip_then_decode(batches, skip: int, stats: Stats, resolution: int, clip_size: int, worker: int, workers: int, cache=None):
    position = skip  # this worker's batch number in the epoch; the loader's index is position * workers + worker
    for index, specs in enumerate(batches):
        if index < skip:
            continue
        if index == skip and skip > 0:
            stats.take()  # what the skipped batches counted was counted before the restart
        examples = []
        for spec in specs:
            try:
                examples.append(decode_example(spec, resolution, clip_size, cache))
            except CorruptSample as exn:
                stats.count("undecodable_image", str(exn), key=f"{spec.target.shard}/{spec.target.key}")
                continue
            if examples[-1]["upsampled"]:
                stats.count("upsampled_target")
        if not examples:
            continue
        while len(examples) < len(specs):
            examples.append(examples[len(examples) % len(examples)])
        batch = collate(examples)
        batch["stats"], batch["shards"] = stats.take()
        batch["index"] = position * workers + worker
        position += 1
        yield batch


def in_order(batches, start: int, max_pending: int = 64):
    """Batches sorted by their epoch index, starting at ``start``. The DataLoader takes batches
    from its workers round-robin beginning with worker 0, which after a resume in the middle of
    an epoch is not the order an uninterrupted run saw; this restores that order (it holds about
    one batch per worker)."""
    pending = {}
    expected = start
    for batch in batches:
        pending[batch["index"]] = batch
        while expected in pending:
            yield pending.pop(expected)
            expected += 1
        if len(pending) > max_pending:
            raise RuntimeError(f"loader batch {expected} never arrived ({len(pending)} later batches waiting)")
    if pending:
        raise RuntimeError(f"loader ended with batches {sorted(pending)} still waiting for batch {expected}")


# ---------------------------------------------------------------- the stream


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class IdentityStream(torch.utils.data.IterableDataset):
    """Batches of (1 target + k references) examples for one process; see the module docstring.

    Use with ``torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)``
    (``make_loader``); call ``set_position(epoch, batches_done)`` before each pass.
    """

    def __init__(
        self,
        shards,
        *,
        resolution: int,
        clip_size: int,
        references: int = 4,
        batch_size: int = 1,
        batches_per_epoch: int = 1000,
        num_workers: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        examples_per_identity: int = 1,
        shuffle_buffer: int = 64,
        holdout_fraction: float = 0.0,
        cache=None,
    ):
        super().__init__()
        self.cache = cache  # trainer.precompute.Cache or None
        self.urls = list_shards(shards)
        self.resolution = resolution
        self.clip_size = clip_size
        self.references = references
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.workers = max(1, num_workers)
        self.batches_per_worker = math.ceil(batches_per_epoch / self.workers)
        self.epoch_length = self.batches_per_worker * self.workers
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.examples_per_identity = examples_per_identity
        self.shuffle_buffer = shuffle_buffer
        self.holdout_fraction = holdout_fraction
        self.epoch = 0
        self.batches_done = 0
        self.notes = shard_plan(len(self.urls), world_size, num_workers)
        for note in self.notes:
            warnings.warn(note, stacklevel=2)
            log.warning(note)

    def set_position(self, epoch: int, batches_done: int = 0) -> None:
        """Where the next pass starts: epoch number and loader batches already taken in it."""
        if not 0 <= batches_done < self.epoch_length:
            raise ValueError(f"batches_done {batches_done} outside the epoch of {self.epoch_length} batches")
        self.epoch, self.batches_done = epoch, batches_done

    def worker_skip(self, worker: int) -> int:
        """Batches worker ``worker`` skips: DataLoader takes batches from workers round-robin."""
        return max(0, -(-(self.batches_done - worker) // self.workers))

    def worker_shards(self, worker: int) -> list[str]:
        return assign_shards(self.urls, self.rank, self.world_size, worker, self.workers)

    def __iter__(self):
        worker, workers = _worker()
        if workers != self.workers:
            raise RuntimeError(
                f"IdentityStream was set up for {self.workers} loader worker(s) but runs in {workers}: "
                "build the DataLoader with the same num_workers (make_loader does)"
            )
        skip = self.worker_skip(worker)
        if skip >= self.batches_per_worker:
            return  # this worker's share of the epoch was taken before the restart (with_epoch(0) would not stop)
        seed = mix_seed(self.seed, self.epoch, self.rank, worker)
        rng = random.Random(seed)
        stats = Stats()
        urls = self.worker_shards(worker)
        pipeline = wds.DataPipeline(
            wds.ResampledShards(urls, seed=seed, worker_seed=lambda: 0, deterministic=True),
            partial(_note_shards, stats=stats, limit=max(20, 3 * len(urls))),
            wds.tarfile_to_samples(handler=stats.tar_error),
            partial(_parse_records, stats=stats),
            partial(
                _identity_groups,
                stats=stats,
                min_size=self.references + 1,
                holdout_fraction=self.holdout_fraction,
                heldout=False,
            ),
            partial(_examples, rng=rng, references=self.references, per_identity=self.examples_per_identity, stats=stats),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng),
            partial(_batches, size=self.batch_size),
            partial(
                _skip_then_decode,
                skip=skip,
                stats=stats,
                resolution=self.resolution,
                clip_size=self.clip_size,
                worker=worker,
                workers=self.workers,
                cache=self.cache,
            ),
        ).with_epoch(self.batches_per_worker - skip)
        yield from pipeline


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with the training threads


def make_loader(stream: IdentityStream, pin_memory: bool = False, seed: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=stream.num_workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if stream.num_workers else None,
        persistent_workers=False,  # each pass pickles the stream again, carrying its new position
        worker_init_fn=_one_thread,
        # the loader's own base seed comes from this generator, not the global RNG (the stream seeds itself)
        generator=torch.Generator().manual_seed(seed),
    )


# ---------------------------------------------------------------- validation and probing


def _sequential_records(urls: list[str], stats: Stats):
    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(handler=stats.tar_error),
        partial(_parse_records, stats=stats),
    )


def probe_shards(shards) -> dict:
    """Embedding width and landmark count of the first readable sample."""
    urls = list_shards(shards)
    for record in _sequential_records(urls, Stats()):
        return {"embedding_dim": int(record.embedding.shape[0]), "landmark_points": int(record.landmarks.shape[0])}
    raise RuntimeError(f"no readable sample in {len(urls)} shard(s) starting {urls[0]}")


def heldout_groups(shards, holdout_fraction: float) -> list[list[Record]]:
    """Every held-out identity's records (``is_heldout`` under ``holdout_fraction``, as training
    splits them), in shard order; the evaluation protocol's identities (``trainer.evaluate``)."""
    stats = Stats()
    return list(_identity_groups(_sequential_records(list_shards(shards), stats), stats, 1, holdout_fraction, True))


def fixed_examples(
    shards,
    count: int,
    *,
    references: int,
    resolution: int,
    clip_size: int,
    holdout_fraction: float,
    heldout: bool | None = True,
    seed: int = 0,
) -> list[dict]:
    """``count`` decoded examples, one per identity, read in shard order: held-out identities
    for validation (``heldout=True``) or any identity (``None``). The same arguments always
    give the same examples."""
    rng = random.Random(mix_seed(seed, "fixed"))
    stats = Stats()
    examples = []
    groups = _identity_groups(
        _sequential_records(list_shards(shards), stats), stats, references + 1, holdout_fraction, heldout
    )
    for group in groups:
        if len(examples) >= count:
            break
        try:
            example = decode_example(choose_example(group, references, rng), resolution, clip_size)
        except CorruptSample as exn:
            stats.count("undecodable_image", str(exn), key=group[0].identity_id)
            continue
        records = _by_keys(group, example["reference_keys"])
        try:
            example["reference_faces"] = [decode_image(r.face, f"{r.key}.face.jpg") for r in records]
            example["reference_images"] = [decode_image(r.image, f"{r.key}.jpg") for r in records]
        except CorruptSample as exn:
            stats.count("undecodable_image", str(exn), key=group[0].identity_id)
            continue
        examples.append(example)
    return examples


def _by_keys(group: list[Record], keys: list[str]) -> list[Record]:
    by_key = {r.key: r for r in group}
    return [by_key[k] for k in keys]
