"""The ImageNet-1k class list shipped with the package (index, WordNet id, name)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files


@dataclass(frozen=True)
class ImageNetClass:
    index: int
    wnid: str
    name: str


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[ImageNetClass, ...]:
    """The 1000 classes in logit order (which is also the sorted order of the WordNet ids)."""
    text = files("aim_mlx").joinpath("data/imagenet1k_classes.tsv").read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines()[1:] if line.strip()]
    classes = tuple(ImageNetClass(int(i), wnid, name) for i, wnid, name in rows)
    if [c.index for c in classes] != list(range(len(classes))):
        raise RuntimeError("the shipped imagenet1k_classes.tsv is out of order")
    return classes


def label(index: int) -> str:
    return imagenet_classes()[index].name


@lru_cache(maxsize=1)
def wnid_to_index() -> dict[str, int]:
    return {c.wnid: c.index for c in imagenet_classes()}
