"""``make demo``: build pipelines/demo.yaml offline.

Serves ``data/demo/web`` on a free port of 127.0.0.1 for the URL-list source, points the
recipe's ``${DATAKIT_DEMO_BASE_URL}`` at it, runs the build, stops the server whatever
happens, and prints Table 6 and the figures (Figs. 11-13, 16) of the demo corpus. Usage: ``python -m datakit.demo [--output DIR] [--restart]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "pipelines" / "demo.yaml"
WEB_ROOT = REPO / "data" / "demo" / "web"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datakit.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help="output folder (default: the recipe's, manifests/demo)")
    parser.add_argument("--restart", action="store_true", help="discard an earlier demo build first")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from datakit.cli import main as cli_main
    from datakit.testing.httpserver import PhotoServer

    with PhotoServer(WEB_ROOT) as server:
        os.environ["DATAKIT_DEMO_BASE_URL"] = f"{server.base_url}/files/"
        cli_args = ["run", str(RECIPE)]
        if args.output:
            cli_args += ["--output", str(args.output)]
        if args.restart:
            cli_args.append("--restart")
        if args.quiet:
            cli_args.append("--quiet")
        code = cli_main(cli_args)
    if code == 0:
        print_figures(args.output or REPO / "manifests" / "demo")
    return code


def print_figures(output: Path) -> None:
    """Table 6 and the paper's figures of the corpus just built (Fig. 13 ages, Fig. 16 genders)."""
    from datakit.audit.cli import print_stats
    from datakit.audit.folder import OutputFolder
    from datakit.audit.stats import compute

    print_stats(compute(OutputFolder(str(output))))


if __name__ == "__main__":
    sys.exit(main())
