"""The Gradio web UI. ``app.service`` is its one door into ``trainer``; the tab modules hold layout only.

Start it with ``python launch.py`` (see ``launch.py --help``).
"""
