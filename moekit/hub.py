"""Hugging Face Hub repository ids as checkpoint paths, found in the local Hub cache.

``moekit inspect Qwen/Qwen3-30B-A3B`` reads the snapshot that ``hf download`` (or
transformers) left in the cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``). Nothing is downloaded unless the caller asks
(``download``; ``moekit ... --download``), and ``HF_HUB_OFFLINE=1`` forbids that too.
A path that exists always wins over a repo id of the same spelling, and only a ``str``
is read as a repo id (a ``pathlib.Path`` is a path). ``ORG/NAME@REVISION`` names a
branch, tag or commit (default ``main``).

huggingface_hub is imported only when a name is not a local path, so reading local
checkpoints starts no faster or slower for it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import (CONFIG_NAME, INDEX_NAME, MODEL_CARD, SIDECARS, SINGLE_NAME, as_path,
                         index_files)
from .errors import MoekitError, printable

_REPO_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}", re.ASCII)
"""What may be a repo id (``huggingface_hub.utils.validate_repo_id`` has the last word):
``NAME`` or ``ORG/NAME`` of letters, digits, ``-``, ``_`` and ``.``."""


@dataclass(frozen=True)
class RepoId:
    """A Hub model repository and the revision asked for."""

    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo if self.revision is None else f"{self.repo}@{self.revision}"

    def how_to_download(self) -> str:
        """What a user runs to put this revision into the cache."""
        revision = "" if self.revision is None else f" --revision {self.revision}"
        return printable(f"pass --download (moekit.hub.download in Python) or run `hf "
                         f"download {self.repo}{revision}`")


def repo_id(value: object) -> RepoId | None:
    """``value`` as a repo id when it is a ``str`` naming nothing on the local file system
    and spelled as one (``ORG/NAME`` or ``NAME``, optionally ``@REVISION``); else None."""
    if not isinstance(value, str) or os.path.lexists(value):
        return None
    repo, at, revision = value.partition("@")
    if not _REPO_ID.fullmatch(repo) or (at and not _is_revision(revision)):
        return None
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        return None
    return RepoId(repo, revision or None)


_REVISION = re.compile(r"(?!.*\.\.)(?!.*@\{)[^\x00-\x20\x7f~^:?*\[\\]+")
"""Characters and sequences git allows in a ref name (``git check-ref-format``), as the
Hub's branches and tags follow it: no control character, space, ``~^:?*[\\``, ``..`` or
``@{``."""


def _is_revision(revision: str) -> bool:
    """A branch, tag or commit name by git's rules: allowed characters, and every
    ``/``-separated part non-empty, not starting with ``.`` nor ending with ``.`` or
    ``.lock``. huggingface_hub joins the revision to the cache folder to find the ref,
    so ``.``, ``..`` and empty parts would name other files."""
    return bool(_REVISION.fullmatch(revision)) and all(
        part and not part.startswith(".") and not part.endswith((".", ".lock"))
        for part in revision.split("/"))


def local_path(value: object, role: str = "checkpoint", weights: bool = True) -> Path:
    """The local path ``value`` names: itself, or for a repo id the folder of its cached
    snapshot (offline; MoekitError saying how to download it when it is not cached, or
    with ``weights`` when the snapshot lacks a weight file: a config.json alone is all
    ``moekit plan`` needs, and ``hf download`` leaves a file out until it is complete)."""
    repo = repo_id(value)
    if repo is None:
        return as_path(value, role)
    folder = _snapshot(repo, local_files_only=True, patterns=[INDEX_NAME, CONFIG_NAME])
    lacking = _lacking_weights(folder) if weights else None
    if lacking is not None:
        raise MoekitError(_not_cached(repo, True, lacking))
    return folder


def _lacking_weights(folder: Path) -> str | None:
    """The first weight file a cached snapshot lacks (its index, then the index's files;
    without an index ``model.safetensors``; a link to a blob that is gone counts as
    lacking), or None."""
    index = folder / INDEX_NAME
    if not os.path.lexists(index):
        names = [SINGLE_NAME]
    else:
        names = [INDEX_NAME, *(index_files(folder) if index.exists() else [])]
    return next((name for name in names if not (folder / name).exists()), None)


def download(value: str, weights: bool = True) -> Path:
    """The local folder of the Hub repo id ``value`` after fetching what moekit reads of
    it into the Hub cache: the files its index names (without an index
    ``model.safetensors``), the index, config.json and sidecar files, nothing else of
    the repository; without ``weights`` only its config.json, which is all ``moekit
    plan`` needs. A local path is returned as it is."""
    repo = repo_id(value)
    if repo is None:
        return as_path(value, "checkpoint")
    if not weights:
        return _snapshot(repo, local_files_only=False, patterns=[CONFIG_NAME])
    listed = [INDEX_NAME, *SIDECARS]
    folder = _snapshot(repo, local_files_only=False, patterns=listed)
    files = index_files(folder) if (folder / INDEX_NAME).exists() else [SINGLE_NAME]
    return _snapshot(repo, local_files_only=False, patterns=[*listed, *files])


def download_config(value: str | Path) -> Path:
    """The local folder of the Hub repo id ``value`` after fetching its config.json and the
    files that travel with it (``GivenConfig``: the sidecars but the model card); a local
    path is returned as it is."""
    repo = repo_id(value)
    if repo is None:
        return as_path(value, "config")
    return _snapshot(repo, local_files_only=False,
                     patterns=[name for name in SIDECARS if name != MODEL_CARD])


def _snapshot(repo: RepoId, local_files_only: bool, patterns: list[str]) -> Path:
    """``huggingface_hub.snapshot_download`` of ``repo`` limited to ``patterns``, its
    errors as one MoekitError naming the repo id."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (HFValidationError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled)

    if not local_files_only and constants.HF_HUB_OFFLINE:
        local_files_only = True
    if local_files_only:
        _check_ref(repo)
    try:
        return Path(snapshot_download(repo.repo, revision=repo.revision,
                                      local_files_only=local_files_only,
                                      allow_patterns=patterns))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        raise MoekitError(_not_cached(repo, local_files_only)) from err
    except HFValidationError as err:
        raise MoekitError(f"{printable(str(repo))} is no local path, nor a Hugging Face repo "
                          f"id with a revision the Hub accepts: {err}") from None
    except OSError as err:  # the Hub's HTTP errors (repository or revision not found, ...)
        raise MoekitError(f"cannot fetch the Hugging Face repository {printable(str(repo))}: "
                          f"{printable(str(err).splitlines()[0])}") from err


def _check_ref(repo: RepoId) -> None:
    """Refuse the cache's ``refs`` file of ``repo``'s revision unless it is a plain file
    holding a commit hash. huggingface_hub reads it to find the revision's snapshot
    folder: it would wait forever on a pipe, fail on bytes that are not text, and follow
    a path such as ``../../..`` out of the cache."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    ref = (Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo.repo, repo_type="model")
           / "refs" / (repo.revision or "main"))
    try:
        if not os.path.lexists(ref) or _COMMIT.fullmatch(repo.revision or ""):
            return
        if not ref.is_file():
            raise MoekitError(f"the Hugging Face cache's {printable(str(ref))}, which names "
                              f"the snapshot of {printable(str(repo))}, is not a plain file")
        with open(ref, "rb") as file:
            text = file.read(_REF_BYTES + 1)
    except OSError as err:
        raise MoekitError(f"cannot read the Hugging Face cache's {printable(str(ref))}: "
                          f"{err.strerror or err}") from err
    if not _COMMIT.fullmatch(text.decode("latin-1")):
        raise MoekitError(f"the Hugging Face cache's {printable(str(ref))} holds no commit "
                          f"hash, where huggingface_hub wrote the snapshot of "
                          f"{printable(str(repo))}: run `hf download` again, or remove it")


_COMMIT = re.compile(r"[0-9a-f]{40}\s?")
"""A commit hash, as the Hub cache's ``refs`` files hold them (huggingface_hub writes it
with no newline; one is allowed)."""
_REF_BYTES = 64
"""Bytes of a ``refs`` file read: a commit hash and room to spare."""


def _not_cached(repo: RepoId, local_files_only: bool, lacking: str | None = None) -> str:
    """Why a repo id could not be read (its snapshot ``lacking`` a file), and what to do."""
    from huggingface_hub import constants

    shown = printable(str(repo))
    where = (f"{shown} is not a local path, and the Hugging Face repository {shown} is not "
             f"(or not completely) in the local cache {printable(constants.HF_HUB_CACHE)}")
    if lacking is not None:
        where += f": its snapshot lacks {printable(lacking)}"
    if constants.HF_HUB_OFFLINE:
        return (f"{where}; HF_HUB_OFFLINE is set, so nothing is downloaded: unset it and "
                f"{repo.how_to_download()}")
    if local_files_only:
        return f"{where}; moekit downloads nothing unless told: {repo.how_to_download()}"
    return f"{where}, and it could not be downloaded"
