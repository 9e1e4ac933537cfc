"""`progan promote models:/NAME/VERSION`: point the `champion` alias at a reviewed version.

Every finished run registers its generator with the alias `candidate`
(pipeline.tools.registry); after looking at it (`progan ui`, `progan evaluate
models:/progan@candidate ...`), `progan promote models:/progan@candidate` (or a version
number) moves `champion` there, and `models:/progan@champion` is what serving and the
tools use from then on.
"""

from __future__ import annotations

import argparse

from pipeline.tools.args import reports_errors


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `promote` subcommand."""
    p = subparsers.add_parser(
        "promote",
        help="move a registered generator's champion alias to a version (after review)",
        description="Point ALIAS (default champion) at the version MODEL names.",
    )
    p.add_argument("model", help="models:/NAME/VERSION or models:/NAME@ALIAS (e.g. @candidate)")
    p.add_argument("--alias", default="champion", help="the alias to move")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else runs/mlflow.db)",
    )
    p.set_defaults(func=run)


@reports_errors
def run(args: argparse.Namespace) -> int:
    """Move the alias; say where it pointed before."""
    from pipeline.tools.generator import ToolError
    from pipeline.tools.model_uri import is_model_uri
    from pipeline.tools.registry import promote
    from pipeline.tracking.tracker import resolve_uri

    if not is_model_uri(args.model):
        raise ToolError(f"not a registered model: {args.model} (models:/NAME/VERSION or @ALIAS)")
    version, before = promote(resolve_uri(args.tracking_uri, "runs"), args.model, args.alias)
    was = f" (was version {before})" if before else ""
    print(f"{args.alias}: {version.model_uri}{was}; use models:/{version.name}@{args.alias}")
    return 0
