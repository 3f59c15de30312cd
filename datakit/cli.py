"""``datakit`` command line: ``run`` a recipe, see a build's ``status``.

Also ``python -m datakit``. Exit codes: 0 done, 1 the build failed (a bug: its traceback, with a
line saying so), 2 a user mistake (recipe, list, argument or output folder: one or two plain
lines), 75 the build stalled (no partition finished within ``ray.stall_timeout``): run it again
to resume; 130 Ctrl-C and 143 SIGTERM: stopped cleanly, run it again to resume.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from datakit import registry
from datakit.store import location
from portrait.stopping import EXIT_TERMINATED, Terminated, stop_on_sigterm

console = Console(soft_wrap=True)  # long paths stay whole, for people and for grep


def entry() -> int:
    """The ``datakit`` command and ``python -m datakit``: main's exit code, with what is alive
    frozen first. Everything is written and closed by then, and the interpreter's exit skips
    collecting the object graphs of Ray, pandas and pyarrow it would free a moment later anyway:
    0.36 -> 0.07 s from the end of main to exit (measured). In-process callers use ``main``."""
    code = main()
    gc.freeze()
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    stop_on_sigterm()
    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader that went away shows here, in the handler below, not at exit
        return code
    except Terminated:
        console.print("[red]stopped[/red] (SIGTERM): run the same command again to resume")
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]: run the same command again to resume")
        return 130
    except BrokenPipeError:
        # The reader went away (`datakit explain ... | head`): stop quietly, as Unix tools do.
        # stdout goes to /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the pipe
    except Exception:  # noqa: BLE001 - not a mistake of the user's: say so under the traceback
        import traceback

        traceback.print_exc()
        print("This is a bug in datakit, not a mistake in what you gave it: please report it with the traceback above.",
              file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="datakit", description="Build and audit the HiFi-Portrait corpus.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a build recipe (resumes an interrupted build)")
    p.add_argument("recipe", type=Path, help="recipe YAML, e.g. pipelines/demo.yaml")
    p.add_argument("--output", help="override the recipe's output: a folder or an fsspec URL (s3://bucket/prefix)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--restart", action="store_true", help="discard an earlier build in the output folder")
    p.add_argument("--plan", action="store_true",
                   help="print what would be reused and recomputed (per step, and why), then stop")
    p.add_argument("--quiet", action="store_true", help="no progress display (the summary table still prints)")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="Ray's own logs and progress bars on the terminal too (they always go to OUTPUT/logs/)")
    p.add_argument("--executor", choices=("ray", "local"), default="ray",
                   help="ray (default): Ray actor pools and tasks; local: everything in this process, no Ray")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="where a build stands")
    p.add_argument("output", type=location, help="the build's output folder or URL")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cache", help="inspect the download cache shared by builds; --prune to its size cap")
    p.add_argument("where", help="the cache folder or URL, or a recipe YAML naming it (cache:)")
    p.add_argument("--prune", action="store_true", help="delete the least recently used images down to --max-bytes")
    p.add_argument("--max-bytes", type=int, help="the size cap (default: the recipe's cache.max_bytes, else 100 GB)")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("check", help="validate a recipe without running it")
    p.add_argument("recipe", type=Path)
    p.set_defaults(func=cmd_check)

    from datakit.audit.cli import add_commands as add_audit_commands

    add_audit_commands(sub)  # stats, report, explain, verify, redact, card
    return parser


def cmd_cache(args) -> int:
    from datakit.cache import DEFAULT_MAX_BYTES, DownloadCache
    from datakit.recipe import RecipeError, load_recipe

    where, cap = args.where, DEFAULT_MAX_BYTES
    if where.endswith((".yaml", ".yml")):
        try:
            recipe = load_recipe(where)
        except RecipeError as e:
            console.print(f"[red]recipe error[/red]\n{escape(str(e))}", highlight=False)
            return 2
        if recipe.cache is None:
            console.print(f"{escape(where)}: the recipe has no cache: key", highlight=False)
            return 2
        where, cap = recipe.cache.path, recipe.cache.max_bytes
    cache = DownloadCache(where)
    if args.prune:
        blobs, freed = cache.prune(args.max_bytes if args.max_bytes is not None else cap)
        console.print(f"pruned {blobs} images, {freed / 1e6:.1f} MB", highlight=False)
    s = cache.summary()
    console.print(f"{escape(s['root'])}: {s['blobs']} images, {s['bytes'] / 1e6:.1f} MB, {s['urls']} URLs, "
                  f"{s['redacted']} redaction tombstones", highlight=False)
    return 0


def cmd_check(args) -> int:
    from datakit.recipe import RecipeError, load_recipe

    from datakit.sources import open_lists

    try:
        recipe = load_recipe(args.recipe)
        rows = open_lists(recipe.sources, recipe.path)  # the lists as run reads them
    except RecipeError as e:
        console.print(f"[red]recipe error[/red]\n{escape(str(e))}", highlight=False)
        return 2
    lists = "".join(f"; {name}: {n} rows" for name, n in rows.items())
    console.print(f"{args.recipe}: ok ({len(recipe.sources)} sources{lists}; stages: {', '.join(recipe.stage_names())})",
                  markup=False, highlight=False)
    return 0


def cmd_run(args) -> int:
    from datakit.engine import build
    from datakit.recipe import RecipeError, load_recipe
    from datakit.watchdog import EXIT_STALLED, Stalled

    try:
        recipe = load_recipe(args.recipe, output=args.output)
    except RecipeError as e:
        console.print(f"[red]recipe error[/red]\n{escape(str(e))}", highlight=False)
        return 2
    if args.plan:
        try:
            print_plan(build.plan_build(recipe, restart=args.restart))
        except RecipeError as e:
            console.print(f"[red]error[/red]: {escape(str(e))}", highlight=False)
            return 2
        return 0
    console.print(f"building [bold]{escape(recipe.name)}[/bold] into {escape(str(recipe.output))}", highlight=False)
    try:
        result = build.run(recipe, address=args.address, restart=args.restart, quiet=args.quiet,
                           verbose=args.verbose, executor=args.executor, on_plan=None if args.quiet else print_plan)
    except RecipeError as e:
        console.print(f"[red]error[/red]: {escape(str(e))}", highlight=False)
        return 2
    except (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError) as e:  # the output folder given
        console.print(f"[red]error[/red]: output {escape(str(recipe.output))}: {escape(str(e))}", highlight=False)
        return 2
    except Stalled as e:
        console.print(f"[red]stalled[/red]: {escape(str(e))}", highlight=False)
        return EXIT_STALLED
    print_summary(result)
    return 0


def print_plan(plan) -> None:
    from datakit.engine.reuse import format_plan

    for line in format_plan(plan):
        console.print(line, markup=False, highlight=False)


def print_summary(result) -> None:
    table = Table(title=f"build summary: {escape(str(result.output))}")
    for col in ("stage", "items in", "kept", "dropped", "dropped by reason", "worker s"):
        table.add_column(col, justify="left" if col in ("stage", "dropped by reason") else "right")
    for name, s in result.stages.items():
        dropped = sum(s["dropped"].values())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["dropped"].items(), key=lambda kv: -kv[1]))
        table.add_row(escape(name), str(s["items_in"]), str(s["kept"]), str(dropped), reasons or "-", f"{s['seconds']:.1f}")
    console.print(table)
    console.print(
        f"{result.items} items: {result.kept} kept, {result.items - result.kept} dropped "
        f"in {result.wall_seconds:.1f} s. Manifest: {result.output / 'images.parquet'}",
        markup=False, highlight=False,
    )


def cmd_status(args) -> int:
    from datakit.store import ITEMS, WorkDir, read_metadata

    work = WorkDir(args.output)
    recipe_file = work.root / "recipe.json"
    if not recipe_file.exists():
        console.print(f"[red]{escape(str(args.output))}[/red]: no build here (no _work/recipe.json)", highlight=False)
        return 2
    recorded = json.loads(recipe_file.read_text())
    names = [cls.name for n in registry.STAGES if n in recorded["recipe"]["stages"] for cls in registry.step_classes(n)]
    table = Table(title=escape(f"{args.output}: {recorded['recipe']['name']} (recipe {recorded['hash'][:12]})"))
    for col in ("stage", "state", "partitions done", "items in", "kept", "dropped"):
        table.add_column(col)
    if work.is_done(ITEMS):
        info = json.loads(work.success_path(ITEMS).read_text())
        parts = info["partitions"]
        table.add_row("sources", "done", f"{parts}/{parts}", str(info["items"]), str(info["items"]), "0")
    else:
        parts = 0
        table.add_row("sources", "not started", "-", "-", "-", "-")
    for name in names:
        done = len(work.done_parts(name))
        stats = work.read_stats(name)
        state = "done" if work.is_done(name) else ("running or stopped" if done else "waiting")
        table.add_row(
            name,
            state,
            f"{done}/{parts}",
            str(sum(s["items_in"] for s in stats)),
            str(sum(s["kept"] for s in stats)),
            str(sum(sum(s["dropped"].values()) for s in stats)),
        )
    console.print(table)
    manifest = work.output / "images.parquet"
    if manifest.exists():
        rows = read_metadata(manifest).num_rows
        state = "build complete" if all(work.is_done(n) for n in names) else "from an earlier run; the build is not finished"
        console.print(f"images.parquet: {rows} rows; {state}")
    else:
        console.print("images.parquet: not written yet (the build has not finished)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
