"""Rendering: the Renderer that draws prompts with adapters attached at chosen strengths."""
