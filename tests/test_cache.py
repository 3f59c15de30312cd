"""The download cache shared by builds: a second build fetches nothing, a redacted image is
purged and never served from it again, and `datakit cache --prune` keeps it under its cap."""

from __future__ import annotations

import pyarrow.parquet as pq
import yaml

from datakit.audit.folder import OutputFolder
from datakit.audit.redact import redact
from datakit.cache import DownloadCache
from datakit.cli import main
from datakit.engine import build as runner
from datakit.recipe import load_recipe
from devtools.photoserver import PhotoServer


def recipe_file(tmp_path, server, photos, output: str):
    listing = tmp_path / "urls.csv"
    listing.write_text("url,name\n" + "".join(f"{server.file_url(p)},{p.split('/')[0]}\n" for p in photos))
    path = tmp_path / f"{output}.yaml"
    path.write_text(yaml.safe_dump({
        "name": "cached", "output": output, "cache": "cache",
        "sources": [{"name": "web", "kind": "urls", "path": str(listing), "name_column": "name"}],
        "ray": {"partition_size": 3},
        "stages": {"download": {"allow_private_addresses": True, "retries": 0}},
    }))  # fmt: skip
    return path


def test_builds_share_fetched_images_and_a_redaction_purges_them(tmp_path, faces_dir, capsys):
    photos = [p.relative_to(faces_dir / "dev").as_posix() for p in sorted((faces_dir / "dev" / "Tony_Blair").glob("*.jpg"))[:5]]
    with PhotoServer(faces_dir / "dev") as server:
        runner.run(load_recipe(recipe_file(tmp_path, server, photos, "one")), quiet=True, executor="local")
        first = dict(server.hits())
        runner.run(load_recipe(recipe_file(tmp_path, server, photos, "two")), quiet=True, executor="local")
        assert dict(server.hits()) == first, "a new output folder fetched images the cache holds"
        one = pq.read_table(tmp_path / "one" / "images.parquet")
        two = pq.read_table(tmp_path / "two" / "images.parquet")
        assert two.drop(["attempts"]).equals(one.drop(["attempts"]))
        assert set(two.column("attempts").to_pylist()) == {0} and set(one.column("attempts").to_pylist()) == {1}

        victim = two.to_pylist()[1]
        redact(OutputFolder(tmp_path / "two"), "subject asked to be removed", image_ids=[victim["image_id"]])
        cache = DownloadCache(tmp_path / "cache")
        assert not cache.blob(victim["sha256"]).exists() and cache.get(server.file_url(photos[1])) is None
        runner.run(load_recipe(recipe_file(tmp_path, server, photos, "three")), quiet=True, executor="local")
        fetched = {k: v - first.get(k, 0) for k, v in server.hits().items() if v != first.get(k, 0)}
        assert fetched == {f"/files/{photos[1]}": 1}, "the redacted image was served from the cache"
        assert not cache.blob(victim["sha256"]).exists(), "a redacted image was stored again"

    assert main(["cache", str(tmp_path / "cache")]) == 0
    assert "4 images" in capsys.readouterr().out
    assert main(["cache", str(tmp_path / "three.yaml"), "--prune", "--max-bytes", "0"]) == 0
    out = capsys.readouterr().out
    assert "pruned 4 images" in out and "0 images, 0.0 MB, 0 URLs" in out
