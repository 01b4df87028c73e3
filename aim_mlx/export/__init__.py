"""Exports of a converted model to other formats (Core ML).

The export's choices live here, so that the command line lists them without importing the
exporter (and numpy, PIL, the model) for `--help`."""

PRECISIONS = ("float16", "float32", "mixed")
COMPRESSIONS = ("none", "int8", "palettize4", "palettize6")
TARGETS = ("iOS17", "iOS18")
