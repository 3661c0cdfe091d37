"""Evaluation data: zero-shot classification sets and the snapshot's validation pairs.

Zero-shot sets come in three shapes, all described by an :class:`EvalDataset`:

- a Parquet table with an image column (bytes) and a label column (class index or class name),
  for example the toy web's held-out set;
- an ImageFolder directory (torchvision's convention: one sub-folder per class; with a classnames
  file whose names are the folders' names, each folder is matched by name, see
  :func:`_imagefolder_labels`);
- CLIP_benchmark's webdataset layout (the ``wds_*`` sets it publishes): a directory with
  ``test/nshards.txt``, tar shards ``test/0.tar`` ... holding ``<key>.<webp|png|jpg|jpeg>`` and
  ``<key>.cls`` per image, ``classnames.txt`` and ``zeroshot_classification_templates.txt`` (one
  per line); without those two files, the class names and templates that the clip_benchmark
  package ships for the set's name (``wds/cifar10`` -> ``cifar10``). :func:`wds_location` resolves
  CLIP_benchmark's ``--dataset wds/NAME --dataset_root DIR`` convention (``{dataset}`` and
  ``{dataset_cleaned}`` placeholders in DIR). The directory may be any fsspec URL
  (``s3://bucket/wds_cifar10``, ``https://...``) as well as a local path. A set whose
  ``dataset_type.txt`` says ``retrieval`` (``wds_flickr30k``, ``wds_mscoco_captions``: ``<key>.txt``
  holds the image's captions, one per line) is read as a :class:`PairSet` for retrieval;
- any of them with class names and templates in CLIP_benchmark's JSON format:
  ``{"<dataset>": ["class a", ...]}`` and ``{"<dataset>": ["a photo of a {c}.", ...]}`` (a plain
  list is accepted too; templates may also be CuPL-style ``{"<classname>": [prompts]}``).

When a Parquet file or directory has JSON files named ``*classnames*.json`` and
``*templates*.json`` beside it, they are used unless given explicitly. The dataset's name (used in
metric names, ``zeroshot/<name>/acc1``) is, in order: the one given, the single key of the
classnames file, the directory name (or file stem).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")
LABEL_COLUMNS = ("label", "labels", "class", "target")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_TEMPLATES = ["a photo of a {c}."]


class DatasetError(ValueError):
    """An evaluation set that cannot be used; the message names the input and what to do."""


class EmptySplitError(DatasetError):
    """A snapshot whose split has no rows: a small snapshot's hash split can leave 'val' empty."""


Templates = list[str] | dict[str, list[str]]


@dataclass
class EvalDataset:
    """A zero-shot classification set. ``labels[i]`` indexes ``classnames``."""

    name: str
    source: Path | str  # a local path, or the fsspec URL of a webdataset set
    kind: str  # "parquet" | "imagefolder" | "wds"
    classnames: list[str]
    templates: Templates
    labels: list[int]
    images: list[Any] = field(repr=False)  # bytes (parquet) or file paths (imagefolder)
    templates_source: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (row or file, reason) of unreadable images

    def __len__(self) -> int:
        return len(self.labels)

    def torch_dataset(self, transform: Any) -> Any:
        """A map-style torch Dataset yielding ``(transform(PIL image), label)``."""
        return _ImageLabelDataset(self.images, self.labels, transform, self.source)


class _ImageLabelDataset:
    def __init__(self, images: list[Any], labels: list[int], transform: Any, source: Path):
        self.images, self.labels, self.transform, self.source = images, labels, transform, source
        self.classes = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = decode_image(self.images[i], f"{self.source} row {i}")
        return self.transform(img), self.labels[i]


def decode_image(data: Any, where: str) -> Any:
    """Open image bytes or a path as an RGB PIL image; DatasetError naming ``where`` if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data)
        return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"{where}: image cannot be decoded ({e}); remove or replace it") from e


def _check_image(data: Any) -> str | None:
    """None when PIL can parse the image header and structure, else the reason."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data) as img:
            img.verify()
        return None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        return f"{type(e).__name__}: {e}"


def drop_unreadable(ds: "EvalDataset") -> None:
    """Remove images PIL cannot read, recording each with its reason in ``ds.skipped``."""
    keep_images, keep_labels = [], []
    for i, (img, label) in enumerate(zip(ds.images, ds.labels)):
        reason = "no image bytes" if img is None else _check_image(img)
        if reason is None:
            keep_images.append(img)
            keep_labels.append(label)
        else:
            ds.skipped.append((str(img) if isinstance(img, Path) else f"row {i}", reason))
    ds.images, ds.labels = keep_images, keep_labels


def metric_name(name: str) -> str:
    """A dataset name usable inside MLflow metric names (letters, digits, _ - .)."""
    clean = re.sub(r"[^\w.\-]+", "_", name).strip("_")
    return clean or "dataset"


def _pick(data: Any, name: str, what: str, path: Path, fallback_key: str | None = None) -> Any:
    """CLIP_benchmark's lookup: the dataset's own key, else the only key, else ``fallback_key``."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        if name in data:
            return data[name]
        if len(data) == 1:
            return next(iter(data.values()))
        if fallback_key and fallback_key in data:
            return data[fallback_key]
        raise DatasetError(
            f"{what} file {path} has keys {sorted(data)[:10]} but none named '{name}': "
            f"name the dataset after one of them or give a file with a single key"
        )
    raise DatasetError(f"{what} file {path} must hold a JSON list or an object keyed by dataset name")


def read_classnames(path: Path, name: str) -> list[str]:
    data = _read_json(path, "classnames")
    names = _pick(data, name, "classnames", path)
    if not isinstance(names, list) or not names or not all(isinstance(c, str) for c in names):
        raise DatasetError(f"classnames file {path}: expected a non-empty list of strings for '{name}'")
    return names


def read_templates(path: Path, name: str) -> Templates:
    data = _read_json(path, "templates")
    # CuPL-style class-specific prompts: {classname: [prompts]} directly, no dataset key
    templates = _pick(data, name, "templates", path, fallback_key="imagenet1k")
    if isinstance(templates, list):
        if not templates or not all(isinstance(t, str) and "{c}" in t for t in templates):
            raise DatasetError(f"templates file {path}: every template must be a string containing '{{c}}'")
        return templates
    if isinstance(templates, dict) and all(isinstance(v, list) for v in templates.values()):
        return templates
    raise DatasetError(f"templates file {path}: expected a list of '{{c}}' templates or {{classname: [prompts]}}")


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DatasetError(f"{what} file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{what} file {path} is not valid JSON: {e}") from e


def _single_key(path: Path | None) -> str | None:
    """The dataset name a CLIP_benchmark-format JSON file is keyed by, when it has exactly one key."""
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return next(iter(data)) if isinstance(data, dict) and len(data) == 1 else None


def _sidecar(directory: Path, pattern: str) -> Path | None:
    found = sorted(directory.glob(pattern))
    return found[0] if found else None


def _is_imagefolder(path: Path) -> bool:
    return path.is_dir() and any(p.is_dir() for p in path.iterdir()) and not list(path.glob("*.parquet"))


def load_eval_dataset(
    path: str | Path, classnames: str | Path | None = None, templates: str | Path | None = None, name: str | None = None
) -> EvalDataset | PairSet:
    """Read a zero-shot set from a Parquet file, a directory of Parquet files, an ImageFolder, or
    CLIP_benchmark's webdataset layout (local or at an fsspec URL); a webdataset retrieval set
    comes back as a :class:`PairSet`.

    Guarantees: every label indexes ``classnames``; class names and templates are in
    CLIP_benchmark's format; images PIL cannot read are left out and listed in ``skipped`` with
    their reason; any other problem raises DatasetError naming the file and the fix.
    """
    if is_url(str(path)):
        location = str(path).rstrip("/")
        if not _is_wds(location):
            raise DatasetError(
                f"evaluation set {location} is not in CLIP_benchmark's webdataset layout (no test/nshards.txt "
                "there): sets at a URL are read in that layout; copy other formats to a local path"
            )
        ds_name = metric_name(name or location.rsplit("/", 1)[-1])
        cls_list = read_classnames(Path(classnames), ds_name) if classnames else None
        loaded, wds_tpl = _load_wds(location, ds_name, cls_list)
        if isinstance(loaded, PairSet):
            return loaded
        tpl, tpl_source = (
            (read_templates(Path(templates), ds_name), str(templates)) if templates else wds_tpl or _DEFAULT_TPL
        )
        return _finish(loaded, tpl, tpl_source, Path(templates) if templates else None, location)
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(
            f"evaluation set {path} does not exist: give a Parquet file, a directory of them, or an ImageFolder"
        )
    side_dir = path.parent if path.is_file() else path
    cls_path = Path(classnames) if classnames else _sidecar(side_dir, "*classnames*.json")
    tpl_path = Path(templates) if templates else _sidecar(side_dir, "*templates*.json")
    ds_name = metric_name(name or _single_key(cls_path) or (path.stem if path.is_file() else path.name))
    cls_list = read_classnames(cls_path, ds_name) if cls_path else None
    if tpl_path:
        tpl: Templates = read_templates(tpl_path, ds_name)
        tpl_source = str(tpl_path)
    else:
        tpl, tpl_source = list(DEFAULT_TEMPLATES), _DEFAULT_TPL[1]

    if path.is_dir() and _is_wds(str(path)):
        loaded, wds_tpl = _load_wds(str(path), ds_name, cls_list)
        if isinstance(loaded, PairSet):
            return loaded
        ds = loaded
        if not tpl_path and wds_tpl is not None:
            tpl, tpl_source = wds_tpl
    elif _is_imagefolder(path):
        ds = _load_imagefolder(path, ds_name, cls_list)
    else:
        ds = _load_parquet(path, ds_name, cls_list)
    return _finish(ds, tpl, tpl_source, tpl_path, str(path))


_DEFAULT_TPL: tuple[Templates, str] = (list(DEFAULT_TEMPLATES), "default ('a photo of a {c}.')")


def _finish(ds: EvalDataset, tpl: Templates, tpl_source: str, tpl_path: Path | None, where: str) -> EvalDataset:
    """Attach the templates (checked to cover every class), leave out unreadable images."""
    if isinstance(tpl, dict):
        missing = [c for c in ds.classnames if c not in tpl]
        if missing:
            raise DatasetError(f"templates file {tpl_path} has no prompts for classes {missing[:5]}")
    ds.templates, ds.templates_source = tpl, tpl_source
    drop_unreadable(ds)
    if len(ds) == 0:
        why = f" ({len(ds.skipped)} unreadable, first: {ds.skipped[0][1]})" if ds.skipped else ""
        raise DatasetError(f"evaluation set {where} has no readable images{why}")
    return ds


# ----- CLIP_benchmark's webdataset layout -----
WDS_IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")  # CLIP_benchmark's order of preference
WDS_SPLIT = "test"


def wds_location(dataset: str, dataset_root: str) -> tuple[str, str]:
    """CLIP_benchmark's ``--dataset wds/NAME --dataset_root DIR``: (the set's directory, its name).
    DIR may hold ``{dataset}`` / ``{dataset_cleaned}`` (NAME with '/' as '-'), as in CLIP_benchmark."""
    if not dataset.startswith("wds/"):
        raise DatasetError(
            f"--dataset-root goes with --dataset wds/NAME (CLIP_benchmark's convention), not {dataset!r}"
        )
    name = dataset[len("wds/") :]
    return dataset_root.format(dataset=name, dataset_cleaned=name.replace("/", "-")), name


def is_url(location: str) -> bool:
    """Whether ``location`` is an fsspec URL (``s3://``, ``https://``, ``file://``...), not a path."""
    return "://" in location


def _fs(location: str) -> tuple[Any, str]:
    import fsspec

    try:
        return fsspec.core.url_to_fs(location)
    except (ImportError, ValueError) as e:  # no filesystem for the scheme, or its package is missing
        raise DatasetError(f"cannot read {location}: {e}") from None


def _is_wds(location: str) -> bool:
    fs, root = _fs(location)
    try:
        return fs.isfile(f"{root.rstrip('/')}/{WDS_SPLIT}/nshards.txt")
    except (OSError, PermissionError) as e:
        raise DatasetError(f"cannot read evaluation set {location}: {type(e).__name__}: {e}") from None


def _read_text(fs: Any, path: str) -> str | None:
    """A small text file's content, or None when there is none."""
    try:
        with fs.open(path, "rb") as f:
            return f.read().decode("utf-8")
    except FileNotFoundError:
        return None


def _txt_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


def _shipped(kind: str, name: str) -> Any:
    """The class names or templates the clip_benchmark package ships for ``name`` (None: none)."""
    try:
        import clip_benchmark.datasets as cb
    except ImportError:
        return None
    f = Path(cb.__file__).parent / f"en_{kind}.json"
    return json.loads(f.read_text()).get(name) if f.is_file() else None


def _wds_samples(fs: Any, tar: str, where: str) -> dict[str, dict[str, bytes]]:
    """The samples of one tar shard, streamed: webdataset's grouping of files by key."""
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with fs.open(tar, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                folder, _, base = m.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot or base.startswith("."):
                    continue
                key = f"{folder}/{stem}" if folder else stem
                samples.setdefault(key, {})[ext.lower()] = tf.extractfile(m).read()
    except FileNotFoundError:
        raise DatasetError(f"{where} is missing: its test/nshards.txt counts it") from None
    except tarfile.TarError as e:
        raise DatasetError(f"{where} is not a readable tar file ({e})") from None
    return samples


def _load_wds(location: str, name: str, classnames: list[str] | None) -> tuple[Any, tuple[Templates, str] | None]:
    """A set in CLIP_benchmark's webdataset layout at ``location`` (a path or an fsspec URL): a
    classification set as an EvalDataset with its templates (and where they came from) when it has
    them, a retrieval set as a PairSet."""
    fs, root = _fs(location)
    root = root.rstrip("/")
    kind = (_read_text(fs, f"{root}/dataset_type.txt") or "classification").strip().lower()
    if kind not in ("classification", "retrieval"):
        raise DatasetError(
            f"{location} is a CLIP_benchmark {kind} set: clipline reads classification and retrieval sets"
        )
    nshards_file = f"{location}/{WDS_SPLIT}/nshards.txt"
    try:
        nshards = int((_read_text(fs, f"{root}/{WDS_SPLIT}/nshards.txt") or "").strip())
    except ValueError:
        raise DatasetError(f"{nshards_file} must hold the number of tar shards") from None
    images: list[bytes] = []
    labels: list[int] = []
    texts: list[list[str]] = []
    keys: list[str] = []
    skipped: list[tuple[str, str]] = []
    field_name = "txt" if kind == "retrieval" else "cls"
    for i in range(nshards):
        where = f"{location}/{WDS_SPLIT}/{i}.tar"
        for key, parts in _wds_samples(fs, f"{root}/{WDS_SPLIT}/{i}.tar", where).items():
            img = next((parts[e] for e in WDS_IMAGE_EXTENSIONS if e in parts), None)
            if img is None or field_name not in parts:
                what = "an image" if img is None else ("captions (txt)" if kind == "retrieval" else "a cls label")
                skipped.append((f"{where}:{key}", f"sample without {what}"))
                continue
            if kind == "retrieval":
                caps = [c for c in parts["txt"].decode("utf-8").splitlines()]
                texts.append(caps)
            else:
                try:
                    labels.append(int(parts["cls"].decode().strip()))
                except ValueError:
                    skipped.append((f"{where}:{key}", f"cls is not a class index: {parts['cls'][:20]!r}"))
                    continue
            keys.append(f"{i}/{key}")
            images.append(img)
    if kind == "retrieval":
        return _retrieval_set(name, keys, texts, images, skipped, location), None
    names_text = _read_text(fs, f"{root}/classnames.txt")
    names = classnames or (_txt_lines(names_text) if names_text is not None else _shipped("classnames", name))
    if not names:
        raise DatasetError(
            f"{location} has no classnames.txt and clip_benchmark ships no class names for {name!r}: "
            "give --classnames FILE or put classnames.txt (one per line) in it"
        )
    bad = sorted({x for x in labels if not 0 <= x < len(names)})
    if bad:
        raise DatasetError(f"{location}: labels {bad[:5]} are out of range for {len(names)} class names")
    tpl: tuple[Templates, str] | None = None
    tpl_text = _read_text(fs, f"{root}/zeroshot_classification_templates.txt")
    if tpl_text is not None:
        tpl = (_txt_lines(tpl_text), f"{location}/zeroshot_classification_templates.txt")
    elif (shipped := _shipped("zeroshot_classification_templates", name)) is not None:
        tpl = (shipped, f"clip_benchmark's templates for {name}")
    ds = EvalDataset(
        name=name,
        source=location if is_url(location) else Path(location),
        kind="wds",
        classnames=list(names),
        templates=[],
        labels=labels,
        images=images,
    )
    ds.skipped.extend(skipped)
    return ds, tpl


def _retrieval_set(
    name: str, keys: list[str], texts: list[list[str]], images: list[bytes], skipped: list[tuple[str, str]], where: str
) -> PairSet:
    """A retrieval set, its unreadable images left out (and listed) as for classification sets."""
    keep = []
    for i, img in enumerate(images):
        why = _check_image(img)
        if why is None:
            keep.append(i)
        else:
            skipped.append((keys[i], why))
    if not keep:
        raise DatasetError(f"retrieval set {where} has no readable images")
    pairs = PairSet(
        name=name,
        keys=[keys[i] for i in keep],
        captions=[texts[i][0] if texts[i] else "" for i in keep],
        images=[images[i] for i in keep],
        texts=[texts[i] for i in keep],
    )
    pairs.skipped = skipped
    return pairs


def _spelling(name: str) -> str:
    """A class name with the differences that are only spelling removed: case, '_' for ' ', spacing."""
    return " ".join(name.replace("_", " ").casefold().split())


def _imagefolder_labels(path: Path, folders: list[Path], classnames: list[str]) -> list[int]:
    """The class index of each folder, given a classnames file.

    - The folder names and the class names are the same set, up to spelling (case, '_' for ' '):
      each folder takes the index of its own name, whatever order the file lists them in.
    - They share no name at all (WordNet ids such as ``n01440764``, or numbers): the classnames
      file is read in sorted folder order, torchvision's and CLIP_benchmark's convention.
    - They share some names but not all: the set is mislabelled one way or the other, so stop and
      show the first mismatches rather than score against a guess.
    """
    if len(classnames) != len(folders):
        raise DatasetError(
            f"ImageFolder {path} has {len(folders)} class folders but the classnames file lists {len(classnames)}: "
            "they must match one to one (by name, or in sorted folder order)"
        )
    by_spelling: dict[str, int] = {}
    for i, c in enumerate(classnames):
        key = _spelling(c)
        if key in by_spelling:
            raise DatasetError(
                f"classnames for ImageFolder {path} list '{classnames[by_spelling[key]]}' "
                f"and '{c}', which are the same name: each class must appear once"
            )
        by_spelling[key] = i
    folder_keys = [_spelling(f.name) for f in folders]
    matched = [k in by_spelling for k in folder_keys]
    if all(matched):
        return [by_spelling[k] for k in folder_keys]
    if not any(matched):
        return list(range(len(folders)))
    unmatched_folders = [f.name for f, m in zip(folders, matched) if not m]
    unused = [
        classnames[i]
        for i in sorted(set(by_spelling.values()) - {by_spelling[k] for k in folder_keys if k in by_spelling})
    ]
    raise DatasetError(
        f"ImageFolder {path}: {len(unmatched_folders)} of {len(folders)} class folders are not in the classnames file "
        f"(first: {unmatched_folders[:5]}; names of the file no folder has: {unused[:5]}): rename the folders "
        "or fix the classnames file so that the two name the same classes"
    )


def _load_imagefolder(path: Path, name: str, classnames: list[str] | None) -> EvalDataset:
    """One class per sub-folder. Without a classnames file the classes are the folder names in
    sorted order ('_' read as ' '); with one, see :func:`_imagefolder_labels`."""
    folders = sorted(p for p in path.iterdir() if p.is_dir())
    if classnames is None:
        names = [f.name.replace("_", " ") for f in folders]
        folder_label = list(range(len(folders)))
    else:
        names = list(classnames)
        folder_label = _imagefolder_labels(path, folders, names)
    images, labels = [], []
    for folder, label in zip(folders, folder_label):
        for f in sorted(folder.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(f)
                labels.append(label)
    return EvalDataset(
        name=name, source=path, kind="imagefolder", classnames=names, templates=[], labels=labels, images=images
    )


def _load_parquet(path: Path, name: str, classnames: list[str] | None) -> EvalDataset:
    import pyarrow.parquet as pq

    files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    if not files:
        raise DatasetError(f"{path} holds no .parquet files and no class sub-folders: it is not an evaluation set")
    images: list[bytes] = []
    raw_labels: list[Any] = []
    for f in files:
        schema = pq.read_schema(f)
        img_col = next((c for c in IMAGE_COLUMNS if c in schema.names), None)
        lab_col = next((c for c in LABEL_COLUMNS if c in schema.names), None)
        if img_col is None or lab_col is None:
            raise DatasetError(
                f"{f} needs an image column ({'/'.join(IMAGE_COLUMNS)}) and a label column "
                f"({'/'.join(LABEL_COLUMNS)}); it has {schema.names}"
            )
        table = pq.read_table(f, columns=[img_col, lab_col])
        images.extend(table.column(img_col).to_pylist())
        raw_labels.extend(table.column(lab_col).to_pylist())
    if all(isinstance(x, str) for x in raw_labels):
        names = classnames or sorted(set(raw_labels))
        index = {c: i for i, c in enumerate(names)}
        unknown = sorted(set(raw_labels) - set(index))
        if unknown:
            raise DatasetError(f"{path}: labels {unknown[:5]} are not in the classnames file")
        labels = [index[x] for x in raw_labels]
    elif all(isinstance(x, int) and not isinstance(x, bool) for x in raw_labels):
        if classnames is None:
            raise DatasetError(
                f"{path} has integer labels but no classnames: give --classnames FILE "
                "(CLIP_benchmark format) or put a *classnames*.json beside it"
            )
        names = classnames
        bad = [x for x in raw_labels if not 0 <= x < len(names)]
        if bad:
            raise DatasetError(f"{path}: labels {sorted(set(bad))[:5]} are out of range for {len(names)} class names")
        labels = list(raw_labels)
    else:
        raise DatasetError(
            f"{path}: the label column must be all integers (class indices) or all strings (class names)"
        )
    return EvalDataset(
        name=name, source=path, kind="parquet", classnames=list(names), templates=[], labels=labels, images=images
    )


# ----- the snapshot's validation pairs (retrieval) -----


@dataclass
class PairSet:
    """Image-caption pairs for retrieval: row i's caption belongs to row i's image. ``texts``, when
    given, holds every caption of each image (a CLIP_benchmark retrieval set), ``captions`` the first."""

    name: str
    keys: list[str]
    captions: list[str]
    images: list[bytes] = field(repr=False)
    texts: list[list[str]] | None = field(default=None, repr=False)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def torch_dataset(self, transform: Any) -> Any:
        return _PairDataset(self, transform)


class _PairDataset:
    def __init__(self, pairs: PairSet, transform: Any):
        self.pairs, self.transform = pairs, transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[Any, list[str]]:
        img = decode_image(self.pairs.images[i], f"pair {self.pairs.keys[i]}")
        texts = self.pairs.texts
        return self.transform(img), list(texts[i]) if texts is not None else [self.pairs.captions[i]]


def load_snapshot_pairs(snapshots_dir: Path, snapshot_id: str, split: str = "val", limit: int | None = None) -> PairSet:
    """The ``split`` rows of a snapshot, read from exactly ``manifest["files"]``, in a stable key order.
    ``snapshot_id`` may be the URL of a snapshot directory in object storage (then ``snapshots_dir``
    is not used)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import fsspec
    import pyarrow as pa

    from clipline.components import storage

    base, snapshot_id, in_store = storage.snapshot_location(snapshots_dir, snapshot_id)
    manifest_path = f"{base}/{snapshot_id}/manifest.json"
    with storage.storage_errors("snapshot", f"{base}/{snapshot_id}"):  # one path for both, through fsspec
        fs, root = fsspec.core.url_to_fs(base)
        try:
            manifest = json.loads(fs.cat_file(f"{root}/{snapshot_id}/manifest.json"))
        except FileNotFoundError:
            hint = "give the URL of a snapshot directory" if in_store else "run `clipline curate` first"
            raise DatasetError(f"snapshot {snapshot_id} has no manifest at {manifest_path}: {hint}") from None
        files = manifest.get("files") or []
        if not files:
            raise DatasetError(f"snapshot {snapshot_id}: manifest lists no files")
        tables = []
        for rel in files:
            try:
                with fs.open(f"{root}/{rel}", "rb") as fh:
                    t = pq.read_table(fh, columns=["key", "caption", "image", "split"])
            except FileNotFoundError:
                raise DatasetError(
                    f"snapshot {snapshot_id} lists {rel} but {base}/{rel} is missing: the snapshot is incomplete"
                ) from None
            tables.append(t.filter(pc.equal(t["split"], split)).drop_columns(["split"]))
    table = pa.concat_tables(tables) if tables else None
    if table is None or table.num_rows == 0:
        raise EmptySplitError(
            f"snapshot {snapshot_id} has no '{split}' rows: curate with a larger val_fraction "
            "(or more data: the split is a hash of each key)"
        )
    table = table.filter(pc.is_valid(table["image"])).sort_by("key")
    if limit is not None:
        table = table.slice(0, limit)
    return PairSet(
        name=split,
        keys=[str(k) for k in table["key"].to_pylist()],
        captions=table["caption"].to_pylist(),
        images=table["image"].to_pylist(),
    )
