"""The shard stage: WebDataset tars under OUTPUT/shards/, grouped by identity, in three steps.

A sample (key K = the image_id, stable across runs) is defined by ``portrait.sample``, which the
trainer reads with: K.jpg (the image, longest side at most ``image_size``, JPEG at
``jpeg_quality``), K.face.jpg (the embed stage's aligned crop), K.json (identity, source,
locator, box and landmarks in K.jpg's pixels, age, gender, caption, sizes), K.embedding.npy and
K.landmarks.npy. This stage decides what goes in (the row's values, scaled to the stored image);
``portrait.sample.encode`` makes and checks the bytes.

1. *Encode* (``encode.py``, a partition step): each kept image's sample is encoded once into the
   work folder, so its exact size is known; a sample that cannot be encoded (no face crop, bytes
   no longer decode) is dropped with ``stage_error`` and the reason in ``detail``.
2. *Plan* (``plan.py``, global, over the narrow columns identity and size): identities sorted by
   id, samples by key, packed in order into shards bounded by ``max_samples`` and ``max_bytes``
   (an identity never splits; one larger than a bound gets a shard of its own), with bounds
   lowered when that gives at least ``min_shards`` shards (one shard feeds one loader worker:
   ranks x workers need that many).
3. *Write* (``write.py``): one task per shard (the executor's fan-out) reads its samples with a
   pyarrow filter and writes the tar under a temporary name, then renames it. Members carry
   fixed metadata (mtime 0, uid/gid 0, no user or group names, mode 0644), so the same input and
   recipe give byte-identical tars. Member names are ``KEY.ext`` with keys checked to be plain
   ``[0-9A-Za-z_-]`` words, so no member can leave the shard's folder.

The engine then writes ``shards.parquet``, ``shard_members.parquet`` (every member's size and
sha256, for verification) and ``identities.parquet`` from what the plan step returns.
"""

from portrait import sample, shardio

SHARDS_DIR = "shards"
ENCODE_STEP = "shard_encode"
RECORD = shardio.RECORD
# member suffix -> column of the encoded sample in the work folder, in the order members are written
MEMBERS = tuple((suffix, suffix.replace(".", "_")) for suffix in sample.MEMBERS)
