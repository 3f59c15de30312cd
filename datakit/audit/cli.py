"""The auditor's subcommands of ``datakit``: stats, report, diff, explain, verify, redact, card.

``add_commands(subparsers)`` registers them on datakit's argparse parser. Each sets ``func``,
which returns the exit code: 0 done (verify: no problem found), 1 the answer is "no" (verify
found problems, explain found no such item), 2 the folder or the arguments cannot be used.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from datakit.audit.folder import AUDIT_DIR, AuditError, OutputFolder
from datakit.store import location

console = Console(soft_wrap=True)  # long paths stay whole, for people and for grep
err = Console(stderr=True, soft_wrap=True)


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("stats", help="corpus statistics: Table 6 (printed, CSV, JSON) and Figs. 11-14, 16 (PNG)")
    p.add_argument("output", type=location, help="the build's output folder or URL (s3://bucket/prefix)")
    p.add_argument("--out", type=Path, help=f"where to write the files (default OUTPUT/{AUDIT_DIR})")
    p.add_argument("--sheets", default="8", help="Fig. 14-style identity sheets: how many identities (a number, or 'all'; default 8)")
    p.add_argument("--identity", action="append", default=[], metavar="NAME", help="draw this identity's sheet first (name or id; repeatable)")
    p.add_argument("--sheet-images", type=int, default=12, help="images per sheet (default 12)")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON instead of tables")
    p.set_defaults(func=cmd_stats)

    p = subparsers.add_parser("report", help="one self-contained HTML page: tables, figures, drop funnel, identity browser")
    p.add_argument("output", type=location, help="the build's output folder or URL (s3://bucket/prefix)")
    p.add_argument("--out", type=Path, help=f"the HTML file (default OUTPUT/{AUDIT_DIR}/report.html)")
    p.add_argument("--identity", action="append", default=[], metavar="NAME", help="list this person's images first (name or id; repeatable)")
    p.add_argument("--detail", type=int, default=300, help="people whose images are listed; the rest show names and counts (default 300)")
    p.add_argument("--thumbs", type=int, default=8, help="thumbnails per identity (default 8)")
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser("diff", help="what changed between two builds, or two states of one build")
    p.add_argument("old", help="a build's output folder or its images.parquet; alone: that build's previous state")
    p.add_argument("new", nargs="?", help="the other build (folder or images.parquet)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_diff)

    p = subparsers.add_parser("explain", help="every stage's decision on one item, with the values behind it")
    p.add_argument("output", type=location, help="the build's output folder or URL (s3://bucket/prefix)")
    p.add_argument("item", help="an image_id, a URL, or a folder source's file path")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_explain)

    p = subparsers.add_parser("verify", help="re-hash every shard and member against the manifests; exit 1 on any problem")
    p.add_argument("output", type=location, help="the build's output folder or URL (s3://bucket/prefix)")
    p.add_argument("--jobs", type=int, default=2, help="shards hashed at once (default 2)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write every problem to FILE as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser("redact", help="remove a person or images from the shards, manifests and work folder")
    p.add_argument("output", type=location, help="the build's output folder or URL (s3://bucket/prefix)")
    p.add_argument("--identity", action="append", default=[], metavar="NAME", help="an identity's name or id (repeatable)")
    p.add_argument("--url", action="append", default=[], help="an image URL (repeatable)")
    p.add_argument("--image-id", action="append", default=[], dest="image_id", metavar="ID", help="an image_id (repeatable)")
    p.add_argument("--reason", required=True, help="why (kept in images.parquet and redactions.jsonl)")
    p.add_argument("--dry-run", action="store_true", help="show what would be removed and change nothing")
    p.set_defaults(func=cmd_redact)

    p = subparsers.add_parser("card", help="write the dataset card OUTPUT/README.md (Hugging Face style front matter)")
    p.add_argument("output", type=location, help="the build's output folder or URL (s3://bucket/prefix)")
    p.add_argument("--print", action="store_true", dest="show", help="also print it")
    p.set_defaults(func=cmd_card)


def _guard(fn):
    """AuditError -> a plain message and exit code 2."""

    def run(args) -> int:
        try:
            return fn(args)
        except AuditError as e:
            err.print(f"[red]error[/red]: {escape(str(e))}", highlight=False)
            return 2

    run.__name__ = fn.__name__
    return run


# ---------------------------------------------------------------- stats


@_guard
def cmd_stats(args) -> int:
    from datakit.audit import plots, sheets, stats
    from datakit.store import atomic_write_bytes

    folder = OutputFolder(args.output)
    limit = _sheet_limit(args.sheets)
    st = stats.compute(folder)
    out = args.out or folder.path(AUDIT_DIR)
    files = {
        "table6.csv": stats.table6_csv(st).encode(),
        "table6.json": (json.dumps(st.table6, indent=2) + "\n").encode(),
        "stats.json": (json.dumps(st.to_json(), indent=2, ensure_ascii=False) + "\n").encode(),
        "fig11_identity_sizes.png": plots.fig11_identity_sizes(st),
        "fig12_face_area.png": plots.fig12_face_area(st),
        "fig13_age.png": plots.fig13_age(st),
        "fig16_gender.png": plots.fig16_gender(st),
    }
    chosen = sheets.choose(sheets.kept_identities(folder), args.identity, limit)
    samples = sheets.kept_samples(folder, [i.identity_id for i in chosen], args.sheet_images)
    for ident in chosen:
        rows = samples[ident.identity_id]
        images = sheets.read_images(folder, rows)
        tiles = [(img, r["caption"], r["key"] or r["image_id"]) for img, r in zip(images, rows)]
        files[f"sheets/fig14_{ident.identity_id}.png"] = plots.identity_sheet(f"Fig. 14: {ident.title}", tiles)
    for stale in (out / "sheets").glob("fig14_*.png"):  # an old sheet may show someone since redacted
        stale.unlink()
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
    if args.json:
        print(json.dumps(st.to_json(), indent=2, ensure_ascii=False))
        return 0
    print_stats(st)
    console.print(f"wrote {len(files)} files to {escape(str(out))} ({len(chosen)} identity sheets)", highlight=False)
    return 0


def _sheet_limit(text: str) -> int | None:
    if text == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise AuditError(f"--sheets {text!r}: give a number of identities or 'all'") from None
    if n < 0:
        raise AuditError("--sheets must be 0 or more")
    return n


def print_stats(st) -> None:
    from datakit.audit.stats import fmt_ratio

    t = Table(title=f"Table 6: {escape(st.build_name or '')} ({st.items} items: {st.kept} kept, {st.dropped} dropped, {st.redacted} redacted)")
    for col in ("source", "identities", "images", "images per identity"):
        t.add_column(col, justify="left" if col == "source" else "right")
    for r in st.table6:
        t.add_row(escape(str(r["source"])), str(r["identities"]), str(r["images"]), fmt_ratio(r["images_per_identity"]), style="bold" if r is st.table6[-1] else None)
    console.print(t)
    for title, counts in (("Fig. 11 identity sizes", st.identity_sizes), ("Fig. 12 face area", st.face_area),
                          ("Fig. 13 age", st.age_groups), ("Fig. 16 gender (images)", st.gender_images),
                          ("Fig. 16 gender (identities)", st.gender_identities)):  # fmt: skip
        shown = ", ".join(f"{k}: {v}" for k, v in counts.items() if v)
        console.print(f"{title}: {escape(shown) or '-'}", highlight=False)


# ---------------------------------------------------------------- report


@_guard
def cmd_report(args) -> int:
    from datakit.audit import report
    from datakit.store import atomic_write_bytes

    folder = OutputFolder(args.output)
    options = report.ReportOptions(detail_people=args.detail, thumbs_per_identity=args.thumbs, identities=tuple(args.identity))
    page = report.build(folder, options)
    out = args.out or folder.path(AUDIT_DIR) / "report.html"
    atomic_write_bytes(out, page.encode("utf-8"))
    console.print(f"wrote {escape(str(out))} ({len(page.encode()) / 1e6:.1f} MB); open it in any browser, offline", highlight=False)
    return 0


# ---------------------------------------------------------------- explain


@_guard
def cmd_diff(args) -> int:
    from datakit.audit import diff

    old, new = args.old, args.new
    if new is None:
        new, old = old, diff.previous_state(OutputFolder(old))
        if old is None:
            raise AuditError(f"{new}: no earlier state in {diff.HISTORY}/ (a run keeps one when it changes images.parquet)")
    found = diff.compare(diff.images_of(old), diff.images_of(new))
    if args.json:
        print(json.dumps(found, indent=2, ensure_ascii=False))
    else:
        print(diff.render_text(found))
    return 0


@_guard
def cmd_explain(args) -> int:
    from datakit.audit import explain

    folder = OutputFolder(args.output)
    try:
        found = explain.explain(folder, args.item)
    except AuditError as e:
        if "no item" not in str(e):
            raise
        err.print(escape(str(e)), highlight=False)
        return 1
    if args.json:
        print(json.dumps(found, indent=2, ensure_ascii=False, default=str))
    else:
        print(explain.render_text(found))
    return 0


# ---------------------------------------------------------------- verify


@_guard
def cmd_verify(args) -> int:
    from datakit.audit import verify

    folder = OutputFolder(args.output)
    report = verify.verify(folder, jobs=args.jobs, progress=not args.quiet)
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    summary = f"{report.shards_checked} shards, {report.members_checked} members, {report.bytes_read / 1e6:.1f} MB re-hashed"
    if report.ok:
        console.print(f"[green]ok[/green]: {summary}; every kept image is in its shard once, nothing else is", highlight=False)
        return 0
    shown: dict[str, int] = {}
    for p in report.problems:
        shown[p.kind] = shown.get(p.kind, 0) + 1
        if shown[p.kind] <= 20:
            print(p.line())
    t = Table(title=f"verify: {len(report.problems)} problems ({summary})")
    t.add_column("problem")
    t.add_column("count", justify="right")
    t.add_column("meaning")
    for kind, n in sorted(report.counts().items()):
        t.add_row(kind, str(n), verify.PROBLEMS.get(kind, ""))
    console.print(t)
    if any(n > 20 for n in shown.values()):
        console.print("(at most 20 lines per kind shown; --json FILE writes them all)")
    return 1


# ---------------------------------------------------------------- redact


@_guard
def cmd_redact(args) -> int:
    from datakit.audit import redact

    folder = OutputFolder(args.output)
    result = redact.redact(folder, args.reason, identities=args.identity, urls=args.url, image_ids=args.image_id, dry_run=args.dry_run)
    if result.finished_interrupted:
        console.print(f"finished a redaction that was interrupted ({result.finished_interrupted}): "
                      "shards, manifests and work folder now agree", highlight=False)
    verb = "would redact" if args.dry_run else "redacted"
    console.print(f"{verb} {len(result.image_ids)} images" + (f" ({len(result.already_redacted)} were redacted before)" if result.already_redacted else ""), highlight=False)
    for i in result.image_ids:
        print(f"  {i}")
    if result.also_dropped:
        console.print(
            f"{'would drop' if args.dry_run else 'dropped'} {len(result.also_dropped)} more images of identities left "
            "with too few images (identity_too_small); they are not redacted themselves", highlight=False,
        )  # fmt: skip
    if not args.dry_run and result.image_ids:
        console.print(f"shards rewritten: {', '.join(result.shards_rewritten) or 'none'}; removed (empty): {', '.join(result.shards_removed) or 'none'}", highlight=False)
        console.print(f"work-folder files scrubbed: {result.work_files_scrubbed}; logged in redactions.jsonl", highlight=False)
        if result.derived_files_removed:
            console.print(f"deleted {', '.join(result.derived_files_removed)} (they showed the images): run `datakit stats` / `datakit report` again", highlight=False)
    return 0


# ---------------------------------------------------------------- card


@_guard
def cmd_card(args) -> int:
    from datakit.audit.card import write_card

    folder = OutputFolder(args.output)
    text = write_card(folder)
    if args.show:
        print(text)
    console.print(f"wrote {escape(str(folder.path('README.md')))}", highlight=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m datakit.audit.cli ...`` until datakit's parser includes these commands."""
    parser = argparse.ArgumentParser(prog="datakit-audit")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
