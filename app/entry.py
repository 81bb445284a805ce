"""The `lora-trainer` command: `lora-trainer ui [...]` starts the web UI (app/launcher.py); every other
subcommand is the trainer's CLI (trainer/cli.py), which never imports the UI."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["ui"]:
        from app.launcher import main as ui_main

        return ui_main(args[1:])
    from trainer.cli import main as cli_main

    if args[:1] in (["-h"], ["--help"]) or not args:
        print("lora-trainer ui [--help]    start the web UI (see docs/SECURITY.md before --listen/--share)\n")
    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
