"""``make demo``: build pipelines/demo.yaml offline.

An example of driving datakit with the dev tools in the open: devtools' PhotoServer serves
``data/demo/web`` on 127.0.0.1 for the recipe's URL-list source, the recipe's
``${DATAKIT_DEMO_BASE_URL}`` points at it, ``datakit run`` builds, and the server stops whatever
happens; then it prints Table 6 and the paper's figures of the corpus (Figs. 11-13, 16). Usage: ``python -m examples.demo [--output DIR] [--restart] [--quiet] [--port N]
[--executor local]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from devtools.photoserver import PhotoServer

REPO = Path(__file__).resolve().parent.parent.parent
RECIPE = REPO / "pipelines" / "demo.yaml"
WEB_ROOT = REPO / "data" / "demo" / "web"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="output folder or URL (default: the recipe's, manifests/demo)")
    parser.add_argument("--restart", action="store_true", help="discard an earlier demo build first")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    parser.add_argument("--port", type=int, default=0, help="the photo server's port (default: a free one)")
    parser.add_argument("--executor", choices=("ray", "local"), default="ray")
    args = parser.parse_args(argv)

    from datakit.cli import main as cli_main

    with PhotoServer(WEB_ROOT, port=args.port) as server:
        os.environ["DATAKIT_DEMO_BASE_URL"] = f"{server.base_url}/files/"
        cli_args = ["run", str(RECIPE), "--executor", args.executor]
        if args.output:
            cli_args += ["--output", args.output]
        if args.restart:
            cli_args.append("--restart")
        if args.quiet:
            cli_args.append("--quiet")
        code = cli_main(cli_args)
    if code == 0:
        print_figures(args.output or str(REPO / "manifests" / "demo"))
    return code


def print_figures(output: str) -> None:
    """Table 6 and the paper's figures of the corpus just built (Fig. 13 ages, Fig. 16 genders)."""
    from datakit.audit.cli import print_stats
    from datakit.audit.folder import OutputFolder
    from datakit.audit.stats import compute

    print_stats(compute(OutputFolder(output)))


if __name__ == "__main__":
    sys.exit(main())
