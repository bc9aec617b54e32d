"""The typed ``manifest.json`` of an image generation (written by builds, updates and imports).

:class:`Manifest` and its parts are frozen pydantic models. One model serves both kinds of
image: what only a build records (``recipe``, ``suite``, ``backend``, ``packages``...) and what
only an import records (``source``, ``digests``, ``runtime``...) are optional fields.

On disk the JSON keeps the shape sidusctl always wrote: :meth:`Record.to_json` dumps exactly the
fields that were given (read from the file, passed by a writer, or set through
``model_copy(update=...)``), so a build manifest holds no import keys and an explicit ``null``
(an import without ``architecture``) stays ``null``. Reading is tolerant of keys this version
does not know (an older or newer sidusctl wrote them; they are dropped on the next write) and
strict about the types of those it knows: a manifest that is not JSON or has a wrong type is a
:class:`~sidusctl.core.errors.StateError` naming the file.

Writers build models (``Manifest(name=..., kind="build", ...)``) or derive a new one from the
current with ``manifest.model_copy(update={...})`` (values must be models/typed values: the
update is not validated).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from sidusctl.core.config import key_name
from sidusctl.core.errors import StateError
from sidusctl.core.state import write_json

JsonObject = dict[str, JsonValue]


#: a size in bytes, a count or a uid/gid as recorded: never negative (a damaged file otherwise
#: shows "-100 B", or makes a cache look smaller than it is)
Count = Annotated[int, Field(ge=0)]


class Record(BaseModel):
    """Base of the manifest models: immutable, strict types, unknown keys ignored on read."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True, populate_by_name=True)

    @classmethod
    def from_data(cls, data: object, where: str = "manifest") -> Self:
        """Validate plain data (what ``json.loads`` gives, or dicts holding tuples) the way a
        file is read. StateError naming ``where`` if it does not fit."""
        try:
            text = json.dumps(data)
        except (TypeError, ValueError) as e:
            raise StateError(f"{where}: not JSON data ({e})") from e
        return cls.parse(text, where)

    @classmethod
    def parse(cls, text: str | bytes, where: str = "manifest") -> Self:
        """Validate JSON ``text``. StateError naming ``where`` (with the bad keys) if it is not
        JSON or does not fit the model."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as e:
            raise StateError(f"{where}: corrupt image manifest ({_problems(e)})") from e

    def to_json(self) -> JsonObject:
        """The JSON object written to disk: the fields that were given, by their JSON names."""
        out: JsonObject = self.model_dump(mode="json", by_alias=True, exclude_unset=True)
        return out


def _problems(e: ValidationError, limit: int = 3) -> str:
    errs = e.errors(include_url=False)
    shown = []
    for err in errs[:limit]:
        loc = [p for p in err.get("loc", ()) if isinstance(p, int | str)]
        key = key_name(loc)
        shown.append(f"key '{key}': {err['msg']}" if key else str(err["msg"]))
    more = f"; and {len(errs) - limit} more" if len(errs) > limit else ""
    return "; ".join(shown) + more


# -- parts -------------------------------------------------------------------------------------

class Package(Record):
    """One installed package (from dpkg-query): ``installed_kib`` as dpkg prints it."""

    version: str
    arch: str
    installed_kib: str


class ExportFile(Record):
    """A file exported next to the rootfs: ``file`` (relative to the generation directory) and
    its ``size`` in bytes."""

    file: str
    size: Count


class KernelExport(ExportFile):
    """``vmlinuz-<name>`` and the kernel ``version`` it was copied from."""

    version: str


class TarballExport(ExportFile):
    """The rootfs tarball: ``compression`` (zstd, gzip, none); ``copy``: where an import also
    copied it (``--tar PATH``)."""

    compression: str
    copy_: str | None = Field(default=None, validation_alias="copy", serialization_alias="copy")


class Exports(Record):
    """Kernel, initrd and tarball, each present only if exported."""

    kernel: KernelExport | None = None
    initrd: ExportFile | None = None
    tarball: TarballExport | None = None

    def files(self) -> dict[str, ExportFile]:
        """``{"kernel": ..., "initrd": ..., "tarball": ...}`` for those present."""
        out: dict[str, ExportFile] = {}
        for k in ("kernel", "initrd", "tarball"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        return out

    def merged(self, newer: Exports) -> Exports:
        """These exports with every entry ``newer`` has replaced by its."""
        return self.model_copy(update={k: getattr(newer, k) for k in newer.model_fields_set})


class RecipeInfo(Record):
    """The recipe a build used: its path, sha256 digest and every value (``Recipe.to_json``)."""

    path: str
    sha256: str
    values: JsonObject


class Sizes(Record):
    """An image's sizes: ``rootfs_bytes``, the root tree's disk usage in bytes (None: not
    measured)."""

    rootfs_bytes: Count | None = None


class Change(Record):
    """A package version change by ``update`` (``from`` None: newly installed)."""

    from_: str | None = Field(validation_alias="from", serialization_alias="from")
    to: str


class LastUpdate(Record):
    """What the last ``sidusctl update`` changed and how long its stages took (seconds)."""

    changed: dict[str, Change]
    timings_s: dict[str, float]


class StageRecord(Record):
    """One stage of a build: ``name``, ``action`` (``ran``, ``reused`` or ``skipped``) and
    ``reason`` (why it ran or what was reused); ``key``: the digest of its inputs where its
    result can be reused, ``sha256``: of what it made (checked before reuse)."""

    name: str
    action: str
    reason: str
    key: str | None = None
    sha256: str | None = None


class Source(Record):
    """Where an import came from: the SOURCE as given (``ref``), its ``kind`` (oci-layout,
    docker-archive, docker-export, registry), the image ``selected`` in it, its repo tags."""

    ref: str
    kind: str
    selected: str | None
    repo_tags: tuple[str, ...]


class LayerRecord(Record):
    """One applied layer: blob ``digest``, ``diff_id``, ``compression``, ``size`` (compressed)
    and ``uncompressed`` bytes, tar ``entries`` written and ``whiteouts`` applied."""

    digest: str
    diff_id: str
    compression: str
    size: Count
    uncompressed: Count
    entries: Count
    whiteouts: Count


class Digests(Record):
    """What an imported OCI image's digests were (``sha256:...``): its ``manifest``, its
    ``config``, and each layer's record in order (None where the source had none)."""

    manifest: str | None
    config: str | None
    layers: tuple[LayerRecord, ...]


class Runtime(Record):
    """What an imported image runs (see :func:`sidusctl.oci.config.install_runtime`):
    ``command`` (argv), ``env`` (``K=V``), ``cwd``, ``user`` as configured and its ``uid``/
    ``gid``/``username``, ``init`` (systemd, sysvinit, none) and ``init_path``, the ``unit``
    made, ``files`` written, ``lxc_snippet`` (relative to the generation), a human ``note``."""

    command: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str
    user: str
    uid: Count
    gid: Count
    username: str | None
    init: str
    init_path: str | None = None
    unit: str | None = None
    files: tuple[str, ...] = ()
    lxc_snippet: str | None = None
    note: str = ""


# -- the manifest ------------------------------------------------------------------------------

class Manifest(Record):
    """``manifest.json`` of one generation. ``kind``: ``build`` or ``import`` (test fixtures
    write others). Fields of the other kind are left unset (and absent from the JSON)."""

    name: str
    kind: str
    sidusctl: str | None = None
    created: str | None = None
    generation: str | None = None
    # builds
    recipe: RecipeInfo | None = None
    suite: str | None = None
    backend: str | None = None
    mirror: str | None = None
    packages: dict[str, Package] = {}
    package_count: Count | None = None
    purged: tuple[str, ...] = ()
    bootstrap_from_cache: bool | None = None
    build_stages: tuple[StageRecord, ...] = ()
    package_inputs: JsonObject = {}
    tree_sha256: str | None = None
    updated: str | None = None
    last_update: LastUpdate | None = None
    # imports
    source: Source | None = None
    platform: str | None = None
    digests: Digests | None = None
    config: JsonObject = {}
    exposed_ports: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    labels: JsonObject = {}
    runtime: Runtime | None = None
    # both
    arch: str | None = None
    sizes: Sizes = Sizes()
    exports: Exports = Exports()
    timings_s: dict[str, float] = {}

    @classmethod
    def load(cls, path: Path) -> Manifest:
        """Read ``path``. FileNotFoundError if it does not exist; StateError naming it if it
        is unreadable, not JSON, or has a known key of the wrong type."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise
        except OSError as e:
            raise StateError(f"{path}: unreadable image manifest ({e})") from e
        return cls.parse(data, str(path))

    @classmethod
    def missing(cls, name: str) -> Manifest:
        """What a generation without ``manifest.json`` reads as: kind ``?``."""
        return cls(name=name, kind="?")

    def save(self, path: Path) -> None:
        """Write :meth:`to_json` to ``path`` atomically (indented, sorted keys)."""
        write_json(path, self.to_json())

    # Read access by JSON key, for callers written against the former dict (tests): new code
    # reads the attributes.
    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.to_json()

    def get(self, key: str, default: Any = None) -> Any:
        """``to_json().get(key, default)``."""
        return self.to_json().get(key, default)


def as_manifest(m: Manifest | Mapping[str, object], where: str = "manifest") -> Manifest:
    """``m`` itself, or the mapping validated into a :class:`Manifest` (StateError if not)."""
    return m if isinstance(m, Manifest) else Manifest.from_data(dict(m), where)


__all__ = ["Change", "Digests", "ExportFile", "Exports", "KernelExport", "LastUpdate",
           "LayerRecord", "Manifest", "Package", "RecipeInfo", "Record", "Runtime", "Sizes",
           "Source", "StageRecord", "TarballExport", "as_manifest"]
