"""Start the web UI: `lora-trainer ui`, `python -m app` or (in a checkout) `python launch.py` serves it on
http://127.0.0.1:7860. The flags say who may reach it and what it may touch (docs/SECURITY.md): exposing it
(--listen, --share) needs --auth or --auth-file unless --insecure; server paths stay under --data-root/--model-root.

Works offline and sends no telemetry. Each training run is a trainer process of its own: Ctrl-C or SIGTERM here
asks it to checkpoint and stop (and says how to resume); if this process is killed, the run keeps training and
the next start reattaches to it. Preview and export run in this process.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from app.rendering import MAX_MODELS
from app.sandbox import Sandbox
from app.uploads import Limits

STOP_TIMEOUT_S = 60     # how long a quit waits for the running trainer to write its checkpoint and adapter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-trainer ui", description="LoRA Trainer web UI (see docs/SECURITY.md "
                                "before exposing it to other machines)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    p.add_argument("--listen", action="store_true",
                   help="bind all network interfaces (0.0.0.0) instead of 127.0.0.1; needs --auth or --auth-file")
    p.add_argument("--share", action="store_true",
                   help="also open a public gradio.live link (needs internet); needs --auth or --auth-file")
    p.add_argument("--auth", metavar="USER:PASS", help="require this user name and password on every page, "
                   "API call and file download")
    p.add_argument("--auth-file", metavar="FILE", help="like --auth, one USER:PASS per line (# comments allowed)")
    p.add_argument("--insecure", action="store_true",
                   help="allow --listen/--share without a password (anyone who reaches the port can use it)")
    p.add_argument("--data-root", action="append", default=[], metavar="DIR",
                   help="a folder 'import a folder on the server' may read (repeatable; default: your home folder "
                        "and the outputs folder, or only the outputs folder with --listen/--share)")
    p.add_argument("--model-root", action="append", default=[], metavar="DIR",
                   help="a folder base-model files and folders may be loaded from (repeatable; same defaults)")
    p.add_argument("--allow-downloads", action="store_true",
                   help="let the UI load hub ids (downloads models from the internet)")
    p.add_argument("--max-upload-mb", type=float, default=Limits.max_upload_mb, metavar="MB",
                   help=f"largest file an upload may be (default {Limits.max_upload_mb:g})")
    p.add_argument("--max-images", type=int, default=Limits.max_images, metavar="N",
                   help=f"most images a run's dataset may hold (default {Limits.max_images})")
    p.add_argument("--max-models", type=int, default=MAX_MODELS, metavar="N",
                   help=f"base models kept loaded for preview; the least recently used is freed (default {MAX_MODELS})")
    p.add_argument("--model", default="builtin",
                   help="default base model: 'builtin', a .safetensors/.ckpt file, a diffusers folder, or a hub id")
    p.add_argument("--outputs", default="outputs", metavar="DIR", help="where runs, datasets and adapters go")
    p.add_argument("--presets-dir", metavar="DIR", help="where presets saved in the UI go (default OUTPUTS/presets)")
    return p


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise SystemExit(f"error: --auth {text!r} is not USER:PASS; give a user name and a password separated by "
                         "a colon, e.g. --auth alice:s3cret (or use --auth-file FILE).")
    return user, password


def read_auth_file(path: str) -> list[tuple[str, str]]:
    """USER:PASS pairs, one per line; blank lines and # comments skipped. SystemExit naming a bad line."""
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise SystemExit(f"error: --auth-file '{path}' cannot be read ({err}); give a text file with one "
                         "USER:PASS per line.") from None
    pairs = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise SystemExit(f"error: --auth-file '{path}' line {number} is not USER:PASS; write one user name and "
                             "password per line separated by a colon.")
        pairs.append((user.strip(), password))
    if not pairs:
        raise SystemExit(f"error: --auth-file '{path}' holds no USER:PASS line; add at least one.")
    return pairs


def resolve_auth(args: argparse.Namespace) -> list[tuple[str, str]] | None:
    """The logins from --auth and --auth-file; SystemExit when the UI would be exposed without one."""
    logins = ([parse_auth(args.auth)] if args.auth else []) + (read_auth_file(args.auth_file) if args.auth_file
                                                              else [])
    exposed = [flag for flag, on in (("--listen", args.listen), ("--share", args.share)) if on]
    if exposed and not logins and not args.insecure:
        verb = "makes" if len(exposed) == 1 else "make"
        raise SystemExit(f"error: {' and '.join(exposed)} {verb} this UI reachable from other machines, and "
                         "anyone reaching it could train, read and write files as you. Add --auth USER:PASS or "
                         "--auth-file FILE (or --insecure to accept that risk).")
    return logins or None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    auth = resolve_auth(args)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"   # before gradio is imported: no telemetry
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

    from app.service import Service
    from app.ui import build_app, launch_options

    exposed = args.listen or args.share
    outputs = Path(args.outputs).expanduser().resolve()
    sandbox = Sandbox.build(outputs, listen=exposed, data_roots=args.data_root, model_roots=args.model_root,
                            allow_downloads=args.allow_downloads, trusted_models=[args.model])
    limits = Limits(max_upload_mb=args.max_upload_mb, max_images=args.max_images)
    service = Service(outputs, default_model=args.model, presets_dir=args.presets_dir, sandbox=sandbox,
                      limits=limits, max_models=args.max_models)
    demo = build_app(service)
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    if exposed and not auth:
        print("warning: --insecure: this UI is reachable without a password.", file=sys.stderr)
    demo.queue(default_concurrency_limit=4)
    _, local_url, share_url = demo.launch(server_name=host, server_port=args.port, share=args.share, auth=auth,
                                          prevent_thread_lock=True, quiet=True, show_error=True,
                                          **launch_options(service))
    threading.Thread(target=service.warm_up, name="warm-up", daemon=True).start()
    print(f"LoRA Trainer is running at {local_url}  (outputs: {service.outputs}; Ctrl-C to quit)", flush=True)
    print(f"Server folders it may read: data {', '.join(map(str, sandbox.data_roots))}; models "
          f"{', '.join(map(str, sandbox.model_roots))}", flush=True)
    if args.listen:
        print(f"Listening on all interfaces, port {args.port}.", flush=True)
    if share_url:
        print(f"Public link: {share_url}", flush=True)
    snap, queued = service.jobs.snapshot(), len(service.jobs.queued())
    if snap.active:
        how = "Reattached to run" if snap.run == service.reattached else "Started queued run"
        print(f"{how} '{snap.run}' (step {snap.step}/{snap.total_steps or '?'}); {queued} more queued.", flush=True)
    quit_signal = _wait_for_quit(demo)
    code = stop_training(service)
    demo.close()
    return 128 + quit_signal if quit_signal else code


def _wait_for_quit(demo) -> int:
    """Serve until SIGINT/SIGTERM (returns its number) or the server ends (0)."""
    caught: list[int] = []
    quit_now = threading.Event()

    def on_signal(signum, frame):
        caught.append(signum)
        quit_now.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    while demo.is_running and not quit_now.wait(0.2):
        pass
    for sig in (signal.SIGINT, signal.SIGTERM):   # a second Ctrl-C while waiting for the trainer quits at once
        signal.signal(sig, signal.SIG_DFL)
    if caught:
        print(f"\n{signal.Signals(caught[0]).name}: shutting down", flush=True)
    return caught[0] if caught else 0


def stop_training(service, timeout: float = STOP_TIMEOUT_S) -> int:
    """Ask the running trainer to checkpoint and stop, wait up to ``timeout`` s, say how to resume. 0 when
    nothing was training or it stopped, 1 when it is still running (it goes on by itself)."""
    snap = service.jobs.snapshot()
    if not snap.active:
        service.jobs.shutdown(0)
        return 0
    print(f"Run '{snap.run}' is training (step {snap.step}/{snap.total_steps or '?'}): asking it to write a "
          f"checkpoint and the adapter; waiting up to {timeout:.0f} s for it…", flush=True)
    end = service.jobs.shutdown(timeout) or snap
    run_dir = service.outputs / snap.run
    if end.active:
        print(f"Run '{snap.run}' is still running (step {end.step}); it stops by itself after its step. Start the "
              "UI again to follow it.", flush=True)
        return 1
    print(f"Run '{snap.run}' {end.state} at step {end.step}" + (f"; adapter: {end.result}" if end.result else "")
          + f". Resume it from the Train tab (Resume), or: python -m trainer train --resume {run_dir}", flush=True)
    queued = service.jobs.queued()
    if queued:
        print(f"{len(queued)} queued run(s) kept in {service.outputs / '.queue.json'}; they start when the UI is "
              "started again.", flush=True)
    return 0

if __name__ == "__main__":
    sys.exit(main())
