"""LoRA trainer core: config, data, models, LoRA injection, training loop, export, preview.

Nothing here imports a UI; the web app and the CLI both drive this package.
"""
__version__ = "0.1.0"
