"""Exports of a converted model to other formats (Core ML)."""
