"""The Gradio web UI. ``app.service`` is its one door into ``trainer``; the tab modules hold layout only.

Start it with ``lora-trainer ui``, ``python -m app`` or ``python launch.py`` (``--help``: app/launcher.py).
"""
