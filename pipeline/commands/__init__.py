"""One module per `progan` subcommand; each defines `register(subparsers)`.

`pipeline.cli` discovers every module in this package, so adding a command never edits a
shared file. `register` adds its parser and sets `func=handler(args) -> int` as default.
"""
