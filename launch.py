"""Start the web UI: `python launch.py` serves it on http://127.0.0.1:7860 (see --help for the flags).

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

STOP_TIMEOUT_S = 60     # how long a quit waits for the running trainer to write its checkpoint and adapter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="LoRA Trainer web UI")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    p.add_argument("--listen", action="store_true",
                   help="bind all network interfaces (0.0.0.0) instead of 127.0.0.1; use with --auth")
    p.add_argument("--auth", metavar="USER:PASS", help="require this user name and password")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    p.add_argument("--model", default="builtin",
                   help="default base model: 'builtin', a .safetensors/.ckpt file, a diffusers folder, or a hub id")
    p.add_argument("--outputs", default="outputs", metavar="DIR", help="where runs, datasets and adapters go")
    return p


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise SystemExit("error: --auth must look like USER:PASS (both non-empty)")
    return user, password


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    auth = parse_auth(args.auth)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"   # before gradio is imported: no telemetry
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

    from app.service import Service
    from app.ui import build_app, launch_options

    service = Service(args.outputs, default_model=args.model)
    demo = build_app(service)
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    if args.listen and not auth:
        print("warning: --listen without --auth lets anyone on your network use this trainer and read files "
              "the server can read; add --auth USER:PASS.", file=sys.stderr)
    demo.queue(default_concurrency_limit=4)
    _, local_url, share_url = demo.launch(server_name=host, server_port=args.port, share=args.share, auth=auth,
                                          prevent_thread_lock=True, quiet=True, show_error=True,
                                          **launch_options(service))
    threading.Thread(target=service.warm_up, name="warm-up", daemon=True).start()
    print(f"LoRA Trainer is running at {local_url}  (outputs: {service.outputs}; Ctrl-C to quit)", flush=True)
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
