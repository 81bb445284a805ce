"""Base models: loading (built-in, diffusers folder, single-file checkpoint, hub id), prompt encoding,
pipelines."""
