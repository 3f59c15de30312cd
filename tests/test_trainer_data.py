"""The trainer's identity stream over WebDataset shards (trainer/data.py)."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch

from trainer.data import (
    IdentityStream,
    assign_shards,
    fixed_examples,
    in_order,
    is_heldout,
    list_shards,
    make_loader,
    probe_shards,
)
from portrait.landmarks import render_landmarks, square_crop, to_crop
from devtools.shards import synthetic_samples, write_shards

RES, CLIP, K = 64, 32, 4


def stream(shards, **kw) -> IdentityStream:
    args = dict(resolution=RES, clip_size=CLIP, references=K, batch_size=3, batches_per_epoch=6, num_workers=0, seed=0)
    args.update(kw)
    return IdentityStream(shards, **args)


def batches(s: IdentityStream, epoch: int = 0, done: int = 0) -> list[dict]:
    s.set_position(epoch, done)
    return list(in_order(make_loader(s), done))


@pytest.fixture(scope="module")
def samples():
    return synthetic_samples(12, 6, seed=1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, samples):
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, samples, identities_per_shard=3)
    return folder


@pytest.fixture(scope="module")
def metadata(samples):
    """key -> (identity, json) of every sample written."""
    return {s["__key__"]: (ident, json.loads(s["json"])) for ident, group in samples.items() for s in group}


def test_examples_are_one_target_and_k_distinct_references_of_its_identity(shards, metadata):
    got = batches(stream(shards))
    assert len(got) == 6
    for batch in got:
        assert batch["pixels"].shape == (3, 3, RES, RES)
        assert batch["landmark_image"].shape == (3, 3, RES, RES)
        assert batch["reference_pixels"].shape == (3, K, 3, CLIP, CLIP)
        assert batch["reference_embeddings"].shape == (3, K, 128)
        assert batch["time_ids"].shape == (3, 6)
        assert batch["pixels"].dtype == batch["landmark_image"].dtype == batch["reference_pixels"].dtype == torch.uint8
        for key, refs, identity in zip(batch["keys"], batch["reference_keys"], batch["identity_ids"]):
            assert metadata[key][0] == identity
            assert {metadata[r][0] for r in refs} == {identity}
            assert key not in refs and len(set(refs)) == K


def test_caption_is_the_prompt_and_landmark_image_is_rendered_from_stored_landmarks(shards, metadata):
    batch = batches(stream(shards))[0]
    for i, key in enumerate(batch["keys"]):
        meta = metadata[key][1]
        assert batch["captions"][i] == meta["caption"]
        left, top, side = square_crop(meta["width"], meta["height"], meta["box"])
        expected = to_crop(np.array(meta["landmarks68"], dtype=np.float32), left, top, side, RES)
        np.testing.assert_allclose(batch["landmarks"][i], expected, atol=1e-4)
        rendered = np.asarray(render_landmarks(expected, RES)).transpose(2, 0, 1)
        np.testing.assert_array_equal(batch["landmark_image"][i].numpy(), rendered)
        assert batch["landmark_image"][i].sum() > 0


def test_same_seed_same_stream_and_next_epoch_differs(shards):
    first = [b["keys"] for b in batches(stream(shards, num_workers=2))]
    again = [b["keys"] for b in batches(stream(shards, num_workers=2))]
    other_epoch = [b["keys"] for b in batches(stream(shards, num_workers=2), epoch=1)]
    assert first == again
    assert first != other_epoch


def test_resuming_mid_epoch_skips_exactly_the_batches_already_taken(shards):
    s = stream(shards, num_workers=2, batches_per_epoch=8)
    full = [b["keys"] for b in batches(s)]
    for done in (1, 3, 6, 7):  # 7: worker 0 has nothing left in the epoch
        assert [b["keys"] for b in batches(s, 0, done)] == full[done:]


def test_held_out_identities_never_reach_training(shards, metadata):
    fraction = 0.25
    heldout = {ident for ident, _ in metadata.values() if is_heldout(ident, fraction)}
    assert heldout and len(heldout) < 12  # the fixture has both kinds
    seen = {i for b in batches(stream(shards, holdout_fraction=fraction, batches_per_epoch=20)) for i in b["identity_ids"]}
    assert seen and not seen & heldout
    val = fixed_examples(shards, 10, references=K, resolution=RES, clip_size=CLIP, holdout_fraction=fraction)
    assert {e["identity_id"] for e in val} == heldout


def test_identities_are_balanced_not_weighted_by_cluster_size(tmp_path):
    data = synthetic_samples(4, 6, seed=2)
    big = synthetic_samples(1, 40, seed=3)
    data["synthetic-big"] = [dict(s, json=s["json"].replace(b"synthetic-000", b"synthetic-big")) for s in big["synthetic-000"]]
    write_shards(tmp_path, data, identities_per_shard=5)
    counts = Counter(i for b in batches(stream(tmp_path, batches_per_epoch=40)) for i in b["identity_ids"])
    # by samples the big identity would take 40/64 of the examples; by identity it takes 1/5
    assert counts["synthetic-big"] / sum(counts.values()) < 0.35
    assert len(counts) == 5


def test_ranks_and_workers_read_disjoint_shards(shards):
    urls = list_shards(shards)
    assert len(urls) == 4
    shares = [set(assign_shards(urls, r, 2, w, 2)) for r in range(2) for w in range(2)]
    assert all(len(s) == 1 for s in shares) and len(set.union(*shares)) == 4
    read = []
    for rank in range(2):
        s = stream(shards, rank=rank, world_size=2, num_workers=2, batches_per_epoch=4)
        read.append({name for b in batches(s) for name in b["shards"]})
    assert read[0] and read[1] and not read[0] & read[1]


def test_fewer_shards_than_ranks_times_workers_warns_and_still_streams(tmp_path, samples):
    one = dict(list(samples.items())[:2])
    write_shards(tmp_path, one, identities_per_shard=2)
    with pytest.warns(UserWarning, match="1 shard"):
        s = stream(tmp_path, rank=1, world_size=2, num_workers=2, batches_per_epoch=4)
    got = batches(s)
    assert len(got) == 4 and all(len(b["keys"]) == 3 for b in got)


def _npy_pickled() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"not": "floats"}], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def _rekeyed(sample: dict, key: str, **members) -> dict:
    """A copy of ``sample`` under a new key (its JSON's image_id too), with ``members`` replaced."""
    meta = dict(json.loads(sample["json"]), image_id=key)
    return dict(sample, __key__=key, json=json.dumps(meta).encode(), **members)


def test_corrupt_samples_are_skipped_and_counted(tmp_path, samples, caplog):
    data = {k: list(v) for k, v in list(samples.items())[:3]}
    group = data["synthetic-000"] = list(data["synthetic-000"]) + [dict(s) for s in data["synthetic-000"][:3]]
    # three broken copies with new keys: bad JSON, a pickled .npy, a truncated face crop
    group[6] = dict(_rekeyed(group[6], "bad0000000000json"), json=b"{not json")
    group[7] = _rekeyed(group[7], "bad00000000pickle", **{"embedding.npy": _npy_pickled()})
    group[8] = _rekeyed(group[8], "bad0000000000face", **{"face.jpg": group[8]["face.jpg"][:200]})
    # valid JSON, wrong-typed fields: once a crash (box) or a prompt "5" (caption) (issue 15 item 6)
    group += [dict(s) for s in data["synthetic-000"][:2]]
    group[9] = _rekeyed(group[9], "bad00000000boxtxt")
    group[9]["json"] = json.dumps(dict(json.loads(group[9]["json"]), box="oops")).encode()
    group[10] = _rekeyed(group[10], "bad0000caption05")
    group[10]["json"] = json.dumps(dict(json.loads(group[10]["json"]), caption=5)).encode()
    write_shards(tmp_path, data, identities_per_shard=3)
    with caplog.at_level("WARNING", logger="trainer.data"):
        got = batches(stream(tmp_path, batches_per_epoch=30, batch_size=4))
    counts = Counter()
    for b in got:
        counts.update(b["stats"])
        assert len(b["keys"]) == 4
    # counted once each, however often the resampled stream reads the shard (once 155 for 31)
    assert counts["corrupt_sample"] == 4
    assert counts["undecodable_image"] == 1
    messages = " ".join(r.getMessage() for r in caplog.records)
    for key in ("bad0000000000json", "bad00000000pickle", "bad0000000000face", "bad00000000boxtxt", "bad0000caption05"):
        assert key in messages
    used = {k for b in got for k in b["keys"] + sum(b["reference_keys"], [])}
    assert not used & {"bad0000000000json", "bad00000000pickle", "bad00000000boxtxt", "bad0000caption05"}


def test_truncated_shard_is_counted_not_fatal(tmp_path, samples):
    paths = write_shards(tmp_path, dict(list(samples.items())[:4]), identities_per_shard=2)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])
    got = batches(stream(tmp_path, batches_per_epoch=12))
    assert len(got) == 12
    assert sum(b["stats"].get("unreadable_shard", 0) for b in got) >= 1


def test_no_usable_identity_is_a_clear_error_not_a_hang(tmp_path, samples):
    small = {k: v[:3] for k, v in list(samples.items())[:2]}  # 3 samples < 1 + k
    write_shards(tmp_path, small, identities_per_shard=1)
    with pytest.raises(RuntimeError, match="no training example"):
        batches(stream(tmp_path))


def test_missing_shards_and_probe(tmp_path, shards):
    with pytest.raises(FileNotFoundError, match="make demo"):
        list_shards(tmp_path / "nowhere")
    assert probe_shards(shards) == {"embedding_dim": 128, "landmark_points": 68}


def test_loader_workers_round_robin_order_is_restored():
    fake = [{"index": i} for i in (4, 3, 6, 5, 7)]
    assert [b["index"] for b in in_order(fake, 3)] == [3, 4, 5, 6, 7]
