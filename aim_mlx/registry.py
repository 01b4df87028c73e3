"""Known models: name -> hub repo, files with their SHA-256 prefixes, architecture, probe layers.

The official AIM v1 models are built in. More can be added with `register(...)` or with a JSON
file named by the environment variable AIM_MLX_REGISTRY:

    {"models": [{"name": "my-aim", "repo": "me/AIM", "revision": "main",
                 "backbone": {"filename": "backbone.pth", "sha256": "0d6f6b8f"},
                 "heads": {"best": {"filename": "head_best.pth", "sha256": "ebd45c05"}},
                 "probe_layers": {"best": [1, 2, 3, 4, 5, 6]},
                 "arch": {"embed_dim": 64, "num_blocks": 8, "num_heads": 4}}]}
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AimMlxError
from .models import PRESETS, ModelArgs, last_probe_layers

REGISTRY_ENV = "AIM_MLX_REGISTRY"
HEADS = ("best", "last")
OFFICIAL_REPO = "apple/AIM"


class RegistryError(AimMlxError, ValueError):
    """An unknown model name or a malformed registry entry."""


@dataclass(frozen=True)
class HubFile:
    filename: str
    sha256: str  # hex prefix of the file's SHA-256 (8 digits for the official files) or all of it
    size: int | None = None  # bytes, when known exactly

    def __post_init__(self):
        parts = str(self.filename).replace("\\", "/").split("/")
        if (
            not isinstance(self.filename, str)
            or self.filename.startswith("/")
            or (set(parts) & {"", ".", ".."})
        ):
            raise RegistryError(
                f"filename must be a file's path inside the repo, like backbone.pth or "
                f"dir/head.pth, got {self.filename!r}"
            )
        if not re.fullmatch(r"[0-9a-f]{8,64}", self.sha256):
            raise RegistryError(
                f"{self.filename}: sha256 must be 8 to 64 lowercase hex digits, got {self.sha256!r}"
            )


@dataclass(frozen=True)
class ModelSpec:
    name: str
    repo: str
    backbone: HubFile
    heads: dict[str, HubFile]  # "best" / "last" -> head file
    probe_layers: dict[str, tuple[int, ...]]  # "best" / "last" -> blocks the head reads
    arch: dict  # ModelArgs fields except probe_layers
    revision: str = "main"
    params: int | None = None
    top1: dict[str, float] = field(default_factory=dict)  # published ImageNet-1k top-1 per head

    def head_file(self, head: str) -> HubFile:
        if head not in self.heads:
            raise RegistryError(
                f"model {self.name} has no {head!r} head (it has: {', '.join(self.heads)})"
            )
        return self.heads[head]

    def model_args(self, head: str) -> ModelArgs:
        self.head_file(head)
        return ModelArgs.from_dict({**self.arch, "probe_layers": self.probe_layers[head]})

    def cache_settings(self, head: str) -> dict:
        """The config values a cache entry of this model and head must hold (besides its files):
        an entry made before the registry entry changed them is converted again."""
        args = self.model_args(head)
        return dict(
            probe_layers=list(args.probe_layers), num_heads=args.num_heads, img_size=args.img_size
        )

    def param_count(self) -> int:
        """The published count, else the architecture's (backbone and head, as the files hold)."""
        return self.params or sum(estimated_sizes(self)) // 4

    def files(self, head: str) -> list[HubFile]:
        return [self.backbone, self.head_file(head)]

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        """A spec from its dict form (a registry file's entry); RegistryError naming the entry
        and the field for anything missing or of the wrong kind."""
        if not isinstance(d, dict):
            raise RegistryError(f"a registry entry must be an object, got {d!r}")
        name = d.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or "--" in name:
            raise RegistryError(  # a cache entry's key is the name, then "--": `cache rm x` took
                # x--ft's entries; "aimé" was "aim_", which `cache rm aimé` did not find
                f"a registry entry needs a name (ASCII letters, digits, ._-, no --), got {name!r}"
            )
        try:
            spec = cls(
                name=name,
                repo=_field(d, "repo", str),
                revision=_field(d, "revision", str, "main"),
                backbone=_hub_file(_field(d, "backbone", dict)),
                heads={h: _hub_file(f) for h, f in _field(d, "heads", dict).items()},
                probe_layers=_field(d, "probe_layers", dict),
                arch=_field(d, "arch", dict),
                params=_field(d, "params", int, None),
                top1=_field(d, "top1", dict, {}),
            )
            if not _is_repo_id(spec.repo):
                raise ValueError(f"repo must be a hub repo id like apple/AIM, got {spec.repo!r}")
            if set(spec.revision.replace("\\", "/").split("/")) & {"", ".", ".."}:
                raise ValueError(  # huggingface_hub writes refs/<revision> in its cache
                    f"revision must be a branch, tag or commit like main, got {spec.revision!r}"
                )
            if spec.params is not None and spec.params < 1:
                raise ValueError(f"params must be a positive integer, got {spec.params!r}")
            fields = {f.name for f in dataclasses.fields(ModelArgs)} - {"probe_layers"}
            if unknown := sorted(set(spec.arch) - fields):  # a typo would be silently a default
                raise ValueError(
                    f"arch has unknown key(s) {', '.join(unknown)}; known: "
                    f"{', '.join(sorted(fields))}"
                )
            if not all(_is_number(v) for v in spec.top1.values()):
                raise ValueError(f"top1 values must be numbers (percent), got {spec.top1!r}")
            if not spec.heads:
                raise ValueError("heads is empty")
            for head in spec.heads:
                if head not in HEADS or head not in spec.probe_layers:
                    raise ValueError(f"head {head!r} must be one of {HEADS}, with probe_layers")
                layers = spec.model_args(head).probe_layers  # validates the architecture
                spec.probe_layers[head] = layers
        except (ValueError, TypeError) as e:
            raise RegistryError(f"registry entry {name!r}: {e}") from None
        return spec


def _is_repo_id(repo: str) -> bool:
    """An id the hub (huggingface_hub) accepts: one or two names of 96 letters, digits and ._-
    at most, neither starting nor ending with . or -, without -- or .., not ending in .git."""
    name = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
    return re.fullmatch(f"{name}(/{name})?", repo) is not None and not (
        "--" in repo or ".." in repo or repo.endswith(".git")
    )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_MISSING = object()
_KINDS = {str: "a string", int: "an integer", dict: "an object"}


def _field(d: dict, key: str, kind: type, default=_MISSING):
    """d[key], of type `kind` (a bool is no int), or `default` when absent."""
    if key not in d and default is not _MISSING:
        return default
    if key not in d:
        raise ValueError(f"missing {key}")
    value = d[key]
    if not isinstance(value, kind) or kind is int and isinstance(value, bool):
        raise ValueError(f"{key} must be {_KINDS[kind]}, got {value!r}")
    return dict(value) if kind is dict else value


def _hub_file(f) -> HubFile:
    if not isinstance(f, dict):
        raise ValueError(f"a file must be an object with filename and sha256, got {f!r}")
    size = _field(f, "size", int, None)
    if size is not None and size < 1:  # bytes: the download's disk-space check adds them up
        raise ValueError(f"size must be a positive integer (bytes), got {size!r}")
    return HubFile(_field(f, "filename", str), _field(f, "sha256", str), size)


# (name, file stem, embed_dim, blocks, heads, best layers, params, top-1 last, top-1 best,
#  sha256 prefix of backbone / last head / best head), from the upstream README.
_OFFICIAL = [
    ("aim-600M", "aim_600m_2bimgs", 686_794_752, 78.5, 79.4, "0d6f6b8f", "5ce5a341", "ebd45c05"),
    ("aim-1B", "aim_1b_5bimgs", 1_219_813_376, 80.6, 82.3, "d254ecd3", "db3be2ad", "f1ed7852"),
    ("aim-3B", "aim_3b_5bimgs", 2_741_981_184, 82.2, 83.3, "8475ce4e", "5c057b30", "ad380e16"),
    ("aim-7B", "aim_7b_5bimgs", 6_483_066_880, 82.4, 84.0, "184ed94c", "1e5c99ba", "73ecd732"),
]


def _official(name, stem, params, top1_last, top1_best, sha_bb, sha_last, sha_best) -> ModelSpec:
    preset = dict(PRESETS[name])
    best = tuple(preset.pop("best"))
    return ModelSpec(
        name=name,
        repo=OFFICIAL_REPO,
        backbone=HubFile(f"{stem}_attnprobe_backbone.pth", sha_bb),
        heads={
            "best": HubFile(f"{stem}_attnprobe_head_best_layers.pth", sha_best),
            "last": HubFile(f"{stem}_attnprobe_head_last_layers.pth", sha_last),
        },
        probe_layers={"best": best, "last": last_probe_layers(preset["num_blocks"])},
        arch=preset,
        params=params,
        top1={"best": top1_best, "last": top1_last},
    )


_BUILTIN = {row[0]: _official(*row) for row in _OFFICIAL}
_registered: dict[str, ModelSpec] = {}


def register(spec: ModelSpec | dict, replace: bool = False) -> ModelSpec:
    """Add a model to the registry (a ModelSpec or its dict form, as in a registry file);
    `replace`: it takes the place of the model of that name, in any case."""
    if isinstance(spec, dict):
        spec = ModelSpec.from_dict(spec)
    taken = next((n for n in all_models() if n.lower() == spec.name.lower()), None)
    if taken and not replace:
        raise RegistryError(f"a model named {spec.name!r} is already registered")
    _registered[taken or spec.name] = spec  # under the name it replaces: one entry, not two
    return spec


def _from_env() -> dict[str, ModelSpec]:
    path = os.environ.get(REGISTRY_ENV)
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deep
        raise RegistryError(f"cannot read the registry file {path} ({REGISTRY_ENV}): {e}") from None
    entries = data.get("models") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise RegistryError(
            f'the registry file {path} ({REGISTRY_ENV}): expected {{"models": [...]}} or a '
            "list of entries (see aim_mlx/registry.py)"
        )
    specs = {}
    for d in entries:
        try:
            spec = ModelSpec.from_dict(d)
        except RegistryError as e:
            raise RegistryError(f"the registry file {path} ({REGISTRY_ENV}): {e}") from None
        taken = [n for n in [*_BUILTIN, *specs] if n.lower() == spec.name.lower()]
        if taken:
            what = "a built-in model" if taken[0] in _BUILTIN else "another entry in the file"
            raise RegistryError(
                f"the registry file {path} ({REGISTRY_ENV}): the name {spec.name!r} is taken by "
                f"{what} ({taken[0]}); give the entry another name"
            )
        specs[spec.name] = spec
    return specs


def all_models() -> dict[str, ModelSpec]:
    """Every known model: built-in, then from AIM_MLX_REGISTRY, then registered in this process."""
    return {**_BUILTIN, **_from_env(), **_registered}


def get(name: str) -> ModelSpec:
    """The spec of a model name (case-insensitive)."""
    if not isinstance(name, str):  # None.lower() was an AttributeError
        raise RegistryError(f"a model name must be a string, got {name!r}")
    models = all_models()
    for key, spec in models.items():
        if key.lower() == name.lower():
            return spec
    raise RegistryError(f"unknown model {name!r}; known models: {', '.join(models)}")


def is_known(name: str) -> bool:
    return any(key.lower() == name.lower() for key in all_models())


def estimated_sizes(spec: ModelSpec) -> tuple[int, int]:
    """(backbone, head) float32 file sizes in bytes, from the architecture."""
    D, L, p = spec.arch["embed_dim"], spec.arch["num_blocks"], spec.arch.get("patch_size", 14)
    hidden = spec.arch.get("mlp_ratio", 4) * D
    block = 4 * D * D + 2 * D * hidden + 4 * D  # qkv, proj, fc1, fc2, two LayerNorms
    backbone = 3 * p * p * D + 3 * D + L * block + 2 * D
    head = 2 * D * D + spec.arch.get("num_classes", 1000) * D + 3 * D
    return 4 * backbone, 4 * head
