"""Judges: score or compare generated answers (reward models, programmatic, OpenAI-compatible)."""
