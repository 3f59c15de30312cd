"""The dataset card: OUTPUT/README.md with Hugging Face datasets-style YAML front matter.

Written from the statistics (datakit.audit.stats), the sources the recipe declares (as recorded
in build.json under recipe.sources: name, kind, license, intended_use, homepage) and the
redaction log. The corpus is for research only, as the paper says; a source whose recipe entry
declares no licence or intended use is shown as "not declared", never filled in by guess.
The card holds no date but the build's, so the same folder gives the same card.
"""

from __future__ import annotations

import yaml

from datakit.audit import stats as stats_mod
from datakit.audit.folder import OutputFolder
from datakit.store import atomic_write_bytes

NOT_DECLARED = "not declared in the recipe"
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"))  # fmt: skip


def size_category(n: int) -> str:
    for bound, label in SIZE_CATEGORIES:
        if n < bound:
            return label
    return "n>100M"


def front_matter(folder: OutputFolder, st: stats_mod.Stats) -> dict:
    sources = folder.sources
    licences = "; ".join(f"{s.get('name')}: {s.get('license') or NOT_DECLARED}" for s in sources) or NOT_DECLARED
    return {
        "pretty_name": f"HiFi-Portrait corpus rebuild ({st.build_name or folder.root.name})",
        "license": "other",
        "license_name": "research-only",
        "license_details": f"Research use only. The photos keep their sources' terms: {licences}.",
        "language": ["en"],
        "task_categories": ["text-to-image"],
        "tags": ["faces", "portraits", "identity-preserving-generation", "webdataset"],
        "annotations_creators": ["machine-generated"],
        "size_categories": [size_category(st.kept)],
        "source_datasets": [s.get("name") for s in sources if s.get("name")],
        "configs": [
            {"config_name": "default", "data_files": [{"split": "train", "path": "shards/*.tar"}]},
            {"config_name": "manifest", "data_files": [{"split": "train", "path": "images.parquet"}]},
        ],
    }


def render(folder: OutputFolder, st: stats_mod.Stats | None = None) -> str:
    st = st or stats_mod.compute(folder)
    meta = yaml.safe_dump(front_matter(folder, st), sort_keys=False, allow_unicode=True, width=100)
    build = folder.build
    name = st.build_name or folder.root.name
    runs = build.get("runs") or []
    built = runs[-1].get("finished") if runs else None
    redactions = folder.redactions()
    lines = [
        "---", meta.rstrip(), "---", "",
        f"# HiFi-Portrait corpus rebuild: {name}", "",
        "Portrait photos grouped by identity, with face crops, landmarks, identity embeddings and captions, "
        "for training zero-shot identity-preserving portrait generation (HiFi-Portrait: 1 target and 4 "
        "reference images per identity). Built by `datakit` from the recipe recorded in `build.json`"
        + (f" (recipe hash `{st.recipe_hash[:12]}`" if st.recipe_hash else " (")
        + (f", finished {built})." if built else ")."), "",
        f"{st.kept} images of {st.table6[-1]['identities']} identities kept out of {st.items} input items "
        f"({st.dropped} dropped, {st.redacted} redacted).", "",
        "## Intended use", "",
        "**Research only**, as the HiFi-Portrait paper states for its training data. Out of scope: identifying "
        "or tracking people, face recognition products, surveillance, any commercial use, and making images of "
        "real people without their consent. Every photo keeps the terms of the source it came from (below).", "",
        "## Sources", "",
        "| source | kind | licence | intended use | homepage | input items | kept images |",
        "|---|---|---|---|---|---:|---:|",
    ]  # fmt: skip
    kept_by_source = {r["source"]: r["images"] for r in st.table6[:-1]}
    for s in folder.sources:
        n = s.get("name")
        lines.append(
            f"| {_cell(n)} | {_cell(s.get('kind'))} | {_cell(s.get('license') or NOT_DECLARED)} | "
            f"{_cell(s.get('intended_use') or NOT_DECLARED)} | {_cell(s.get('homepage') or '-')} | "
            f"{st.items_by_source.get(n, 0)} | {kept_by_source.get(n, 0)} |"
        )
    lines += ["", "## Composition (Table 6)", "", "| source | identities | images | images per identity |", "|---|---:|---:|---:|"]
    for r in st.table6:
        lines.append(f"| {_cell(r['source'])} | {r['identities']} | {r['images']} | {stats_mod.fmt_ratio(r['images_per_identity'])} |")
    lines += ["", "An identity can draw images from several sources, so the All row's identities can be fewer than the sum.", ""]
    lines += _distribution("Identity cluster sizes (Fig. 11; identities)", st.identity_sizes)
    lines += _distribution("Face area fraction (Fig. 12; kept images)", st.face_area)
    lines += _distribution("Estimated age (Fig. 13; kept images)", st.age_groups)
    lines += _distribution("Gender (Fig. 16; kept images)", st.gender_images)
    lines += ["## How it was built", "", "Items left after each stage (every input item is a row of `images.parquet` "
              "with its status and, when dropped, the stage, reason code and details):", "",
              "| stage | items in | dropped | left |", "|---|---:|---:|---:|"]  # fmt: skip
    for f in st.funnel:
        lines.append(f"| {_cell(f['step'])} | {f['items_in']} | {f['dropped']} | {f['left']} |")
    lines += [
        "", "## Files", "",
        "- `shards/shard-NNNNN.tar`: WebDataset tars, samples grouped by identity (no identity split across tars). "
        "A sample `KEY` (the image_id) has `KEY.jpg`, `KEY.face.jpg` (aligned face crop), `KEY.json` (metadata and "
        "caption), `KEY.embedding.npy`, `KEY.landmarks.npy`.",
        "- `images.parquet`: one row per input item: source, locator, status, drop stage and reason, face values, "
        "age, gender, caption, identity, shard and key.",
        "- `identities.parquet`, `shards.parquet`, `shard_members.parquet` (sizes and sha256 of every tar and "
        "member: `datakit verify` re-hashes them), `build.json` (recipe, package versions, counts), "
        "`redactions.jsonl` (removals).", "",
        "## Personal data and removal", "",
        "The images show real, identifiable people, and the embeddings are biometric templates. Requests to "
        "remove a person or an image are carried out with `datakit redact OUTPUT --identity NAME | --url URL | "
        "--image-id ID --reason TEXT`, which removes the samples from the shards and the work folder and logs the "
        f"removal. Redactions so far: {len(redactions)} ({st.redacted} images).", "",
        "## Limitations and biases", "",
        "- Ages are model estimates; genders come from first names or a model and are binary labels that can be "
        "wrong and do not describe how people identify. Unknown values are counted as unknown above.",
        "- Identities come from names in the sources and face-embedding clustering; look-alikes can be merged "
        "and one person can be split.",
        "- The sources over-represent public figures (actors, politicians, athletes) photographed by the press.",
        "- Captions are generated (template or model) and describe only what the pipeline estimated.", "",
    ]  # fmt: skip
    return "\n".join(lines)


def _distribution(title: str, counts: dict[str, int]) -> list[str]:
    head = "| " + " | ".join(_cell(k) for k in counts) + " |"
    sep = "|" + "---:|" * len(counts)
    row = "| " + " | ".join(str(v) for v in counts.values()) + " |"
    return [f"### {title}", "", head, sep, row, ""]


def _cell(value) -> str:
    """Table cell text: pipes and newlines would break the table; HTML is shown, not run."""
    text = str(value if value is not None else "-").replace("\n", " ").replace("|", "\\|")
    return text.replace("<", "&lt;").replace(">", "&gt;")


def write_card(folder: OutputFolder, st: stats_mod.Stats | None = None) -> str:
    text = render(folder, st)
    atomic_write_bytes(folder.path("README.md"), text.encode("utf-8"))
    return text
