"""Start the web UI from a checkout: `python launch.py [--help]` (the same as `lora-trainer ui` or
`python -m app`; the code is app/launcher.py)."""
import sys

from app.launcher import main

if __name__ == "__main__":
    sys.exit(main())
