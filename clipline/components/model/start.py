"""Where a training run starts: the architecture to build and the weights to put in it.

A start is given as one string (``train.pretrained``, ``--from-model``) and is one of

- a local checkpoint directory or weights file: the architecture is the checkpoint's own
  (``clipline.json``'s model name, else ``train.model``) and so is its preprocessing (the
  ``preprocess_cfg`` of its ``open_clip_config.json``);
- ``hf-hub:org/repo``: an open_clip model on the Hugging Face Hub (a repo holding
  ``open_clip_config.json`` and weights). open_clip builds it from the repo's config, with the
  repo's preprocessing and tokenizer, and loads its weights;
- an open_clip pretrained tag of ``train.model`` (``laion2b_s34b_b79k`` with ``ViT-B-32``), or the
  pair written ``MODEL:TAG`` (``ViT-B-32:laion2b_s34b_b79k``), as ``open_clip.list_pretrained()``
  lists them: open_clip builds the model and loads the tag's weights with the tag's preprocessing.

Hub files are read through the Hugging Face cache (``HF_HOME``, ``HF_HUB_CACHE``): downloaded once,
then read from there, and read offline with ``HF_HUB_OFFLINE=1``. A start that is neither cached
nor downloadable stops with :class:`StartError` saying how to put it in the cache. Registered
versions and aliases (``3``, ``champion``) are resolved to a checkpoint directory by the caller
(:func:`clipline.components.train.run.resolve_from_model`) before they get here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipline.components.model import checkpoint
from clipline.components.model.errors import ModelError

HUB_PREFIX = "hf-hub:"
HUB_CONFIG = checkpoint.CONFIG_FILE  # a hub repo is laid out as a checkpoint directory
#: weights file names open_clip looks for in a hub repo, in its order (safetensors first)
HUB_WEIGHTS = checkpoint.WEIGHTS_FILES[:2]


class StartError(ModelError):
    """A start that cannot be found, read or fetched; the message says what to do."""


@dataclass(frozen=True)
class Start:
    """A resolved start. ``model`` is what :func:`.factory.create` builds (one of our configs, an
    open_clip name, or ``hf-hub:org/repo``); ``tag`` an open_clip pretrained tag of it that
    open_clip loads; ``weights`` a local weights file loaded after that; ``preprocess`` the
    preprocessing the start was trained with, kept over the architecture's default."""

    ref: str
    model: str
    weights: Path | None = None
    tag: str | None = None
    preprocess: dict[str, Any] | None = None


def is_hub_reference(value: str, model: str | None = None) -> bool:
    """Whether ``value`` names hub weights (``hf-hub:…``, ``MODEL:TAG``, or a tag of ``model``)
    rather than a local checkpoint or a registered version."""
    return value.startswith(HUB_PREFIX) or _tag(value, model) is not None


def resolve(value: str | os.PathLike, model: str) -> Start:
    """The start ``value`` names, for a run whose configured architecture is ``model``; its files
    are on this machine when this returns (hub files in the Hugging Face cache)."""
    ref = str(value)
    p = Path(ref).expanduser()
    if p.exists():
        return local(p, model)
    if ref.startswith(HUB_PREFIX):
        repo = ref[len(HUB_PREFIX) :].strip("/")
        if not repo or repo.count("/") != 1:
            raise StartError(f"{ref!r}: write a Hugging Face model id as hf-hub:org/repo")
        hub_file(repo, (HUB_CONFIG,), ref)
        hub_file(repo, HUB_WEIGHTS, ref)
        return Start(ref=ref, model=ref)
    tagged = _tag(ref, model)
    if tagged is not None:
        name, tag = tagged
        repo, filename = _tag_file(name, tag)
        hub_file(repo, filename, f"{name} {tag}")
        return Start(ref=ref, model=name, tag=tag)
    if "/" in ref or ref.startswith((".", "~")):
        checkpoint.weights_file(p)  # a path that is not there: CheckpointError says so
    raise StartError(
        f"start {ref!r} is not a local checkpoint, an hf-hub:org/repo id, or an open_clip pretrained tag "
        f"of {model!r} (its tags: {', '.join(_tags_of(model)) or 'none'}): give a checkpoint directory, a "
        "registered version or alias, hf-hub:org/repo, or MODEL:TAG as open_clip.list_pretrained() lists them"
    )


def as_checkpoint(start: Start, out_dir: Path) -> Path:
    """``start`` built as training builds it and written as a checkpoint directory ``out_dir`` (its
    config, preprocessing and weights; ``clipline.json`` names the model and the start), so that it
    can be evaluated, registered and compared like any trained model. Kept when already there."""
    if (out_dir / checkpoint.META_FILE).is_file() and checkpoint.read_meta(out_dir).get("start") == start.ref:
        return out_dir
    from clipline.components.model import factory

    bundle = factory.create(start.model, pretrained=start.weights, tag=start.tag, preprocess=start.preprocess)
    meta = {"model_name": start.model, "start": start.ref}
    return checkpoint.save_checkpoint(bundle.model, bundle.model_cfg, out_dir, bundle.preprocess_cfg, meta)


def local(path: Path, model: str) -> Start:
    """A checkpoint directory or weights file: its own model name and preprocessing when it
    records them, ``model`` otherwise."""
    weights = checkpoint.weights_file(path)  # a directory without weights fails here
    meta = checkpoint.read_meta(weights.parent)
    preprocess = None
    if (weights.parent / checkpoint.CONFIG_FILE).is_file():
        preprocess = dict(checkpoint.read_config(weights.parent).get("preprocess_cfg") or {}) or None
    return Start(ref=str(path), model=meta.get("model_name") or model, weights=weights, preprocess=preprocess)


def _tags_of(model: str) -> list[str]:
    import open_clip

    return list(open_clip.list_pretrained_tags_by_model(model))


def _tag(value: str, model: str | None) -> tuple[str, str] | None:
    """``(model, tag)`` when ``value`` is ``MODEL:TAG`` or a tag of ``model``, else None."""
    import open_clip

    if ":" in value and not value.startswith(HUB_PREFIX):
        name, tag = value.split(":", 1)
        if open_clip.is_pretrained_cfg(name, tag):
            return name, tag
        if name in open_clip.list_models():
            raise StartError(
                f"{value!r}: {name} has no pretrained tag {tag!r}; its tags: {', '.join(_tags_of(name)) or 'none'}"
            )
        return None
    if model and open_clip.is_pretrained_cfg(model, value):
        return model, value
    return None


def _tag_file(model: str, tag: str) -> tuple[str, tuple[str, ...]]:
    """The hub repo and the weights file names (open_clip's order) of an open_clip tag."""
    import open_clip

    hub = open_clip.get_pretrained_cfg(model, tag).get("hf_hub", "")
    if not hub:
        raise StartError(f"{model} {tag}: open_clip lists no Hugging Face Hub location for it")
    repo, filename = os.path.split(hub)
    if not filename:
        return repo, HUB_WEIGHTS
    stem, ext = os.path.splitext(filename)
    # open_clip reads a safetensors twin first when the repo has one (pretrained.py)
    safe = HUB_WEIGHTS[0] if filename == HUB_WEIGHTS[1] else stem + ".safetensors"
    return repo, ((safe,) if ext in (".bin", ".pth") else ()) + (filename,)


def hub_file(repo: str, filenames: tuple[str, ...], what: str) -> Path:
    """The first of ``filenames`` in hub repo ``repo``, from the Hugging Face cache or downloaded
    into it. Raises StartError naming ``what`` and how to pre-download it."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    reason = ""
    for name in filenames:
        try:
            return Path(hf_hub_download(repo_id=repo, filename=name))
        except EntryNotFoundError:
            continue  # the repo has no file of this name: try the next
        except RepositoryNotFoundError as e:
            raise StartError(f"{what}: the Hugging Face Hub has no repo {repo!r} ({_first_line(e)})") from e
        except LocalEntryNotFoundError as e:
            reason = _first_line(e)
            continue
        except OSError as e:  # network failures surface as requests/httpx OSErrors
            reason = _first_line(e)
            continue
    offline = constants.is_offline_mode()
    how = (
        f"download it once where there is internet access, into the same cache: "
        f"`hf download {repo} {' '.join(dict.fromkeys(filenames))}`"
    )
    if offline:
        raise StartError(
            f"{what}: {repo} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE "
            f"is set: {how}"
        )
    raise StartError(
        f"{what}: could not fetch {' or '.join(filenames)} of {repo} into the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}){': ' + reason if reason else ''}; {how}"
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
