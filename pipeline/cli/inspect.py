"""`progan inspect OUT`: print a prepared dataset's manifest and write a contact sheet PNG."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `inspect` subcommand."""
    p = subparsers.add_parser("inspect", help="show a prepared dataset and its contact sheet")
    p.add_argument("out", help="prepared dataset directory")
    p.add_argument("--sheet", default=None, help="PNG path (default: OUT/contact_sheet.png)")
    p.add_argument("-n", type=int, default=16, help="records per resolution")
    p.add_argument("--seed", type=int, default=0, help="which records the sheet shows")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the manifest summary and reject counts; write the contact sheet."""
    from rich.console import Console
    from rich.table import Table

    from preprocessing.lmdb_store import read_manifest
    from preprocessing.sheet import contact_sheet

    console = Console()
    try:
        manifest = read_manifest(args.out)
    except FileNotFoundError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}")
        return 2
    table = Table(title=f"{args.out}  (fingerprint {manifest['fingerprint']})")
    table.add_column("key")
    table.add_column("value")
    table.add_row("source", f"{manifest['source']['path']} ({manifest['source']['entries']} files)")
    table.add_row("record format", manifest["record_format"]["encoding"])
    for res in manifest["resolutions"]:
        table.add_row(f"res-{res:04d}", str(manifest["counts"][str(res)]))
    table.add_row("rejected", str(manifest["rejects"]["total"]))
    for reason, count in manifest["rejects"]["by_reason"].items():
        table.add_row(f"  {reason}", str(count))
    for key, value in manifest["config"].items():
        table.add_row(f"config.{key}", str(value))
    for key, value in manifest["software"].items():
        table.add_row(key, value)
    console.print(table)
    sheet = Path(args.sheet) if args.sheet else Path(args.out) / "contact_sheet.png"
    if manifest["records"]:
        console.print(f"contact sheet: {contact_sheet(args.out, sheet, args.n, args.seed)}")
    return 0
