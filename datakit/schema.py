"""The manifest schema: the one place that defines columns, types, statuses and reason codes.

Every input item ends as exactly one row of ``images.parquet``. Stages add columns; the
stage that drops an item sets ``status="dropped"``, ``drop_stage``, ``reason`` (a code from
``REASONS``) and ``detail`` (plain words: the HTTP status, the error text, the image it
duplicates). ``manifests/README.md`` documents the same list for people; a test keeps the two
in step.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from portrait.ids import image_id  # noqa: F401  the id of the image_id column (one definition, shared with the trainer)

SCHEMA_VERSION = 1

KEPT = "kept"
DROPPED = "dropped"
REDACTED = "redacted"
STATUSES = (KEPT, DROPPED, REDACTED)

# reason code -> (stage that uses it, what it means)
REASONS: dict[str, tuple[str, str]] = {
    # download (URL sources) and read (folder sources)
    "invalid_url": ("download", "the URL cannot be parsed or has no host"),
    "unsupported_scheme": ("download", "the URL's scheme is not http or https"),
    "refused_address": (
        "download",
        "the host resolves to a private, loopback, link-local or reserved address "
        "(also checked after every redirect); allow with download.allow_private_addresses",
    ),
    "dns_error": ("download", "the host name does not resolve"),
    "http_error": ("download", "the server answered with an error status (see http_status)"),
    "timeout": ("download", "no complete answer within download.timeout_s, after retries"),
    "connection_error": ("download", "the connection failed or closed before the body ended"),
    "too_many_redirects": ("download", "more redirects than download.max_redirects, or a loop"),
    "too_large": ("download", "the body is larger than download.max_bytes"),
    "opted_out": ("download", "the server sent X-Robots-Tag noai or noimageai"),
    "file_missing": ("download", "a folder-source file vanished or cannot be read"),
    # folder entries the source does not read (no bytes are read)
    "outside_root": ("sources", "a symbolic link leading outside the folder source's root (follow_symlinks: true reads it)"),
    "hidden_file": ("sources", "a file or folder whose name starts with a dot (a folder's row stands for all it holds)"),
    "symlink_loop": ("sources", "a symbolic link to a folder that contains it"),
    # decode (both source kinds)
    "undecodable": ("download", "the bytes are not an image Pillow can fully decode"),
    "too_many_pixels": ("download", "the image declares more pixels than download.max_pixels"),
    "image_too_small": ("download", "the image's shorter side is under download.min_side"),
    # exact duplicates, across all sources
    "duplicate_exact": ("dedup", "same bytes (sha256) as the kept image named in duplicate_of"),
    # faces
    "no_face": ("detect", "no face found"),
    "no_face_matches_hint": ("detect", "no face matches the source's box for the labelled person (detect.hint_min_iou)"),
    "face_too_small_area": ("filter", "the subject's face box covers under filter.min_area_fraction of the image"),
    "multiple_faces": ("filter", "more than one comparable face and none clearly dominates"),
    "face_too_small_px": ("filter", "the subject's face box is under filter.min_face_px pixels"),
    "face_blurry": ("filter", "the face crop's sharpness is under filter.min_sharpness"),
    "duplicate_near": ("dedup", "a near-duplicate (perceptual hash and embedding) of duplicate_of"),
    # identities
    "identity_outlier": ("cluster", "the face does not match the dominant face of its name"),
    "identity_too_small": ("cluster", "its identity has fewer than cluster.min_images images"),
    "unclustered": ("cluster", "no identity cluster took this face"),
    # runner
    "stage_error": ("any", "the stage raised on this item; detail holds the error"),
}

# why the caption stage put the template caption in place of a vision-language model's
# (caption_source "template:fallback:<code>"; caption_detail says what was found)
CAPTION_FALLBACKS: dict[str, str] = {
    "vlm_empty": "the model's caption has no words",
    "vlm_names_person": "the model's caption holds a word of the row's label (the person's name)",
    "vlm_names_someone": "the model's caption names somebody: a first name and a capitalised word, or a title and a name",
}

LIST_F32 = pa.list_(pa.float32())


def arrow_schema(columns: dict[str, tuple[pa.DataType, str]]) -> pa.Schema:
    """A manifest's Arrow schema from its documented columns (name -> (type, meaning))."""
    return pa.schema([pa.field(n, t) for n, (t, _) in columns.items()])


# name -> (arrow type, description). Order is the column order of images.parquet.
IMAGE_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "image_id": (pa.string(), "stable id: first 16 hex of sha1(source name + NUL + locator)"),
    "source": (pa.string(), "the recipe's name for the source"),
    "source_kind": (pa.string(), "folder | urls"),
    "locator": (pa.string(), "the URL, or the path relative to the folder source's root"),
    "label": (pa.string(), "the name the source gives (identity folder or name column); null if none"),
    "person_key": (pa.string(), "the source's id for the person (VGGFace2 class id, IMDb nm id): one name per key"),
    "extra": (pa.string(), "the source row's other columns, as a JSON object"),
    "status": (pa.string(), "kept | dropped | redacted"),
    "drop_stage": (pa.string(), "the stage that dropped the item"),
    "reason": (pa.string(), "reason code (see REASONS)"),
    "detail": (pa.string(), "plain words on the decision: error text, HTTP status, kept twin"),
    # download / decode
    "http_status": (pa.int32(), "final HTTP status, null for folder sources and network errors"),
    "attempts": (pa.int32(), "requests made for this item, retries included (0: taken from the download cache)"),
    "final_url": (pa.string(), "the URL after redirects"),
    "content_type": (pa.string(), "the Content-Type header"),
    "sha256": (pa.string(), "sha256 of the bytes as fetched or read"),
    "bytes": (pa.int64(), "size of the bytes as fetched or read"),
    "format": (pa.string(), "format Pillow decoded (JPEG, PNG, WEBP, ...)"),
    "width": (pa.int32(), "width after EXIF orientation"),
    "height": (pa.int32(), "height after EXIF orientation"),
    "mode": (pa.string(), "Pillow mode before conversion to RGB"),
    "duplicate_of": (pa.string(), "image_id of the kept twin for exact or near duplicates"),
    # faces
    "face_backend": (pa.string(), "face model backend (dlib | insightface)"),
    "face_count": (pa.int32(), "faces found"),
    "face_box": (LIST_F32, "subject's face box x0,y0,x1,y1 in pixels, RetinaFace convention"),
    "face_score": (pa.float32(), "detector score of the subject's face"),
    "face_area_fraction": (pa.float32(), "face box area / image area (RetinaFace convention)"),
    "landmarks5": (LIST_F32, "5 points x,y (eyes, nose, mouth corners) in pixels"),
    "landmarks68": (LIST_F32, "68 points x,y in pixels, when the backend gives them"),
    "sharpness": (pa.float32(), "variance of the Laplacian on the aligned face at detect.sharpness_size px"),
    "other_faces": (pa.string(), "JSON list of other faces' boxes and scores (weak: under detect.min_score; not competing)"),
    "hint_iou": (pa.float32(), "overlap of the subject's box with the source's box for the labelled person, when given"),
    "embedding": (LIST_F32, "identity embedding of the subject's face (L2-normalised)"),
    "embedding_model": (pa.string(), "model that made the embedding"),
    "phash": (pa.string(), "perceptual hash (hex) of the image"),
    "phash_mirror": (pa.string(), "perceptual hash (hex) of the image mirrored left-right (flipped copies match it)"),
    "age": (pa.float32(), "estimated age in years"),
    "age_source": (pa.string(), "where age came from (model name) or null"),
    "gender": (pa.string(), "female | male | null"),
    "gender_source": (pa.string(), "source:<source>/<file> | names:<package> | model:<name> | null"),
    "caption": (pa.string(), "caption used as the prompt"),
    "caption_source": (pa.string(), "template | vlm:<model> | template:fallback:<code> (the model's caption was refused, see CAPTION_FALLBACKS)"),
    "caption_detail": (pa.string(), "what made the caption stage refuse the model's caption, in plain words; null otherwise"),
    # identities and shards
    "identity_id": (pa.string(), "identity the image belongs to (kept images)"),
    "identity_distance": (pa.float32(), "embedding distance to its identity's centre"),
    "review_flag": (pa.string(), "why a person should look at this row, or null"),
    "shard": (pa.string(), "shard file (relative to OUTPUT) holding the sample"),
    "key": (pa.string(), "the sample's key inside the shard"),
    # auditing
    "redacted_at": (pa.string(), "UTC time of redaction (ISO 8601)"),
    "redaction_reason": (pa.string(), "why it was redacted"),
}

# Columns that live only in the work folder (bulk bytes): never in images.parquet, never read by
# a global stage.
WORK_COLUMNS: dict[str, pa.DataType] = {
    "image_bytes": pa.binary(),  # the image as fetched or read (download)
    "face_crop": pa.binary(),  # the aligned face crop, JPEG (embed)
}

IMAGES_SCHEMA = arrow_schema(IMAGE_COLUMNS)

# identities.parquet: one row per kept identity (written by the shard stage).
IDENTITY_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "identity_id": (pa.string(), "stable id (see datakit/stages/cluster.py): sha1 of the identity's first name, or of its first image"),
    "names": (pa.list_(pa.string()), "distinct labels of its images, sorted"),
    "sources": (pa.list_(pa.string()), "distinct sources of its images, sorted"),
    "images": (pa.int64(), "kept images of the identity"),
    "gender": (pa.string(), "majority gender of its images (female | male), null if none known"),
    "female": (pa.int64(), "images with gender female"),
    "male": (pa.int64(), "images with gender male"),
    "age_mean": (pa.float32(), "mean estimated age over images that have one"),
    "age_min": (pa.float32(), "youngest estimated age"),
    "age_max": (pa.float32(), "oldest estimated age"),
    "shards": (pa.list_(pa.string()), "shard files (relative to OUTPUT) holding its samples (one, by design)"),
}
IDENTITIES_SCHEMA = arrow_schema(IDENTITY_COLUMNS)

# shards.parquet: one row per WebDataset tar under OUTPUT/shards/.
SHARD_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "path": (pa.string(), "tar file relative to OUTPUT"),
    "bytes": (pa.int64(), "size of the tar file"),
    "sha256": (pa.string(), "sha256 of the tar file"),
    "samples": (pa.int64(), "samples (images) in the tar"),
    "identities": (pa.int64(), "identities in the tar (none is split across tars)"),
}
SHARDS_SCHEMA = arrow_schema(SHARD_COLUMNS)

# shard_members.parquet: one row per tar member, to re-hash shards member by member.
SHARD_MEMBER_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "shard": (pa.string(), "tar file relative to OUTPUT"),
    "key": (pa.string(), "sample key (the image_id)"),
    "member": (pa.string(), "member name inside the tar, e.g. KEY.jpg"),
    "bytes": (pa.int64(), "size of the member's content"),
    "sha256": (pa.string(), "sha256 of the member's content"),
}
SHARD_MEMBERS_SCHEMA = arrow_schema(SHARD_MEMBER_COLUMNS)

# removed.parquet: items an earlier state of the build had and its sources no longer list.
REMOVED_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "image_id": (pa.string(), "the item's id in the earlier build"),
    "source": (pa.string(), "source name"),
    "locator": (pa.string(), "path or URL as the source listed it"),
    "status": (pa.string(), "always removed"),
    "reason": (pa.string(), "always removed_from_source"),
    "removed_at": (pa.string(), "UTC time of the run that noticed"),
}
REMOVED_SCHEMA = arrow_schema(REMOVED_COLUMNS)


def identity_row(items: list[dict]) -> dict:
    """The counted columns of an identities.parquet row (IDENTITY_COLUMNS) from the kept images
    of one identity: dicts with label, source, gender, age and shard (the tar's path as in
    images.parquet). The shard stage and redact both count identities with this."""
    genders = Counter(r["gender"] for r in items if r["gender"] in ("female", "male"))
    top = genders.most_common(2)
    ages = [float(r["age"]) for r in items if r["age"] is not None]
    return {
        "names": sorted({r["label"] for r in items if r["label"]}),
        "sources": sorted({r["source"] for r in items if r["source"]}),
        "images": len(items),
        "gender": top[0][0] if top and (len(top) == 1 or top[0][1] > top[1][1]) else None,
        "female": genders.get("female", 0),
        "male": genders.get("male", 0),
        "age_mean": float(np.mean(ages)) if ages else None,
        "age_min": min(ages) if ages else None,
        "age_max": max(ages) if ages else None,
        "shards": sorted({r["shard"] for r in items if r["shard"]}),
    }


def check_reason(code: str) -> str:
    if code not in REASONS:
        raise ValueError(f"unknown reason code {code!r}; known codes: {', '.join(sorted(REASONS))}")
    return code


def check_caption_fallback(code: str) -> str:
    if code not in CAPTION_FALLBACKS:
        raise ValueError(f"unknown caption fallback {code!r}; known: {', '.join(sorted(CAPTION_FALLBACKS))}")
    return code


def conform(table: pa.Table) -> pa.Table:
    """Project a table onto IMAGES_SCHEMA: known columns cast, missing ones null, others dropped."""
    columns = []
    for field in IMAGES_SCHEMA:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=IMAGES_SCHEMA)
