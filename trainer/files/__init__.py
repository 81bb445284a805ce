"""Adapter files: export (kohya/SGM keys, metadata, hashes), reading and placing other tools' spellings, and the
file tools: inspect, blend (exact or SVD-compacted), resize, bake into a base model, convert kohya <-> PEFT."""
