"""Start the web UI: `python launch.py` serves it on http://127.0.0.1:7860 (see --help for the flags).

Works offline and sends no telemetry; training, preview and export run in this process.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading


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
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        if service.jobs.stop():
            print("Stopping the training run and saving its adapter…", flush=True)
            service.jobs.wait(120)
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
