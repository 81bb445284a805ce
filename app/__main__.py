"""`python -m app [--help]`: start the web UI (app/launcher.py)."""
import sys

from app.launcher import main

sys.exit(main())
