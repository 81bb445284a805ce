"""Adapter files: export (kohya/SGM keys, metadata, hashes), import of other spellings, blending."""
