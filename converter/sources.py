"""Where a base or an adapter comes from: a local directory, or a hub repo pinned to a revision.

Hub sources are resolved with huggingface_hub into its standard cache (or ``cache_dir``),
fetching only the files a job needs, honouring ``HF_HUB_OFFLINE=1`` (then only the local
cache is used) and ``HF_TOKEN`` (read by huggingface_hub itself; never echoed here). The
commit sha a revision resolves to is what receipts record and fingerprints use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from converter.errors import BadInputError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SHA = re.compile(r"^[0-9a-f]{40}$")
TOKENIZER_PATTERNS = ["tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                      "*.model", "chat_template.*"]
BASE_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                 "preprocessor_config.json", "processor_config.json", "modules.json", "sentence_bert_config.json",
                 "config_sentence_transformers.json", "*_Pooling/*", "*_Normalize/*", "*_Dense/*"]
BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]


@dataclass(frozen=True)
class Resolved:
    """A source made local: ``path`` holds its files."""

    path: Path
    repo: str | None = None
    revision: str | None = None  # as asked for
    sha: str | None = None  # the commit it resolved to (hub sources)

    @property
    def is_hub(self) -> bool:
        """Whether the source is a hub repo (else a local directory)."""
        return self.repo is not None


def _patterns(kind: str, subfolder: str | None, trust_remote_code: bool, with_bin: bool) -> list[str]:
    patterns = (BASE_PATTERNS + (BIN_PATTERNS if with_bin else []) if kind == "base" else ADAPTER_PATTERNS)
    patterns = patterns + TOKENIZER_PATTERNS + (["*.py"] if trust_remote_code else [])
    return [f"{subfolder.strip('/')}/{p}" for p in patterns] if subfolder else patterns


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def looks_like_path(text: str) -> bool:
    """A value is a local path when it exists, starts with ``.``, ``/`` or ``~``, has more than one
    ``/`` (a repo id has exactly one), or its first component is an existing directory; anything
    else shaped like ``org/name`` is a hub repo id."""
    if Path(text).exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        return True
    return Path(text.split("/", 1)[0]).is_dir()


def resolve(value: str | Path, kind: str, revision: str | None = None, subfolder: str | None = None,
            cache_dir: str | Path | None = None, trust_remote_code: bool = False) -> Resolved:
    """Make a source local. ``kind`` is "base" or "adapter" (which files it needs)."""
    text = str(value)
    if looks_like_path(text):
        path = Path(text).expanduser()
        if not path.is_dir():
            why = "is a file, not a directory" if path.exists() else f"does not exist (looked at {path.resolve()})"
            raise BadInputError(f"{kind} directory {text} {why}", hint=f"check the --{kind} path")
        return Resolved(path / subfolder if subfolder else path, None, revision, None)
    if not REPO_ID.match(text):
        raise BadInputError(f"{kind} {text!r} is neither an existing directory nor a hub repo id (org/name)",
                            hint=f"check the --{kind} path")
    return _download(text, kind, revision, subfolder, cache_dir, trust_remote_code)


def network_errors() -> tuple[type[BaseException], ...]:
    """The exception types of a hub that cannot be reached (no route, refused, DNS, TLS, timeouts),
    whichever HTTP library this huggingface_hub uses."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        try:
            lib = __import__(module)
        except ImportError:
            continue
        found += [getattr(lib, n) for n in names if isinstance(getattr(lib, n, None), type)]
    return tuple(found)


def _unreachable(kind: str, repo: str, exc: BaseException) -> BadInputError:
    return BadInputError(
        f"{kind} {repo}: the hub cannot be reached ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
        + ("" if Path(repo.split('/')[0]).is_dir() else f"; there is no local directory {repo} either"),
        hint="set HF_HUB_OFFLINE=1 to use what the local hub cache holds, or pass a local directory")


def _download(repo: str, kind: str, revision, subfolder, cache_dir, trust_remote_code) -> Resolved:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = revision or "main"
    offline = _offline()
    with_bin = True
    try:
        if not offline:  # pin the sha first, and fetch .bin weights only where no safetensors exist
            info = HfApi().model_info(repo, revision=rev)
            rev = info.sha
            with_bin = not any(s.rfilename.endswith(".safetensors") for s in info.siblings or [])
        folder = snapshot_download(repo, revision=rev, cache_dir=cache_dir, local_files_only=offline,
                                   allow_patterns=_patterns(kind, subfolder, trust_remote_code, with_bin))
    except network_errors() as exc:
        raise _unreachable(kind, repo, exc) from None
    except (LocalEntryNotFoundError, FileNotFoundError):
        if not offline:  # the hub answered, then could not be reached for the files themselves
            raise BadInputError(f"{kind} {repo} at revision {rev}: its files could not be fetched from the hub "
                                "and are not in the local hub cache",
                                hint="check the network, or set HF_HUB_OFFLINE=1 with a cache that holds it, "
                                "or pass a local directory") from None
        raise BadInputError(
            f"{kind} {repo}: there is no local directory {repo}, and as a hub repo (revision {rev}) it is not in "
            "the local hub cache (HF_HUB_OFFLINE is set)",
            hint=f"check the path if it is a local directory; for a hub repo, download it first (huggingface-cli "
                 f"download {repo} --revision {rev}) or unset HF_HUB_OFFLINE",
        ) from None
    except RevisionNotFoundError:
        raise BadInputError(f"{kind} {repo} has no revision {rev!r}", hint="check the revision (sha, branch, tag "
                            "or refs/pr/N)") from None
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise BadInputError(f"{kind} {repo}: there is no local directory {repo}, and the hub repository is not "
                            f"found or not accessible ({type(exc).__name__})",
                            hint="check the path or the repo id, and that HF_TOKEN grants access to it") from None
    folder = Path(folder)
    sha = folder.name if SHA.match(folder.name) else rev
    path = folder / subfolder if subfolder else folder
    if not path.is_dir():
        raise BadInputError(f"{kind} {repo}@{sha[:12]} has no subfolder {subfolder!r}", hint="check `subfolder`")
    return Resolved(path, repo, revision, sha)


def resolve_sha(repo: str, kind: str, revision: str | None, cache_dir=None) -> str:
    """The commit sha a revision names, without fetching weights (for `converter lock`)."""
    if revision and SHA.match(revision):
        return revision
    if _offline():  # the cache's refs/ say it; nothing is fetched
        return _download(repo, kind, revision, None, cache_dir, False).sha
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        return HfApi().model_info(repo, revision=revision or "main").sha
    except network_errors() as exc:
        raise _unreachable(kind, repo, exc) from None
    except RevisionNotFoundError:
        raise BadInputError(f"{kind} {repo} has no revision {revision!r}", hint="check the revision") from None
    except RepositoryNotFoundError:
        raise BadInputError(f"{kind} {repo}: repository not found or not accessible",
                            hint="check the repo id, and that HF_TOKEN grants access to it") from None


def open_base(value: str | Path, revision: str | None = None, subfolder: str | None = None, cache_dir=None,
              trust_remote_code: bool = False, metadata_only: bool = False):
    """(Resolved, Checkpoint) of a base directory or hub repo.

    ``metadata_only`` (validate, inspect, planning): a hub base is read through its safetensors
    headers alone when the hub can be reached, without downloading its weights; the
    Checkpoint then plans but cannot merge.
    """
    from converter.adapter import is_base_checkpoint_dir
    from converter.checkpoint import Checkpoint

    if metadata_only and not looks_like_path(str(value)) and REPO_ID.match(str(value)):
        remote = base_metadata(str(value), revision, subfolder, cache_dir)
        if remote is not None:
            specs, src = remote
            return src, Checkpoint.from_specs(src.path, specs)
    src = resolve(value, "base", revision, subfolder, cache_dir, trust_remote_code)
    is_base_checkpoint_dir(src.path)
    return src, Checkpoint(src.path)


def base_metadata(repo: str, revision: str | None, subfolder: str | None = None, cache_dir=None):
    """(tensor specs, Resolved with the directory holding config.json) of a hub base without fetching its weights.

    Online, the safetensors headers are read with ranged requests (huggingface_hub's
    ``get_safetensors_metadata``); offline, from the files in the local cache.
    """
    from converter.checkpoint import SAFETENSORS_DTYPES, TensorSpec

    if _offline():
        return None
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi()
    try:
        sha = api.model_info(repo, revision=revision or "main").sha
        prefix = f"{subfolder.strip('/')}/" if subfolder else ""
        config = Path(hf_hub_download(repo, f"{prefix}config.json", revision=sha, cache_dir=cache_dir))
        meta = api.get_safetensors_metadata(repo, revision=sha)
    except Exception as exc:  # noqa: BLE001 - not found, no safetensors, network: fall back to a download
        del exc
        return None
    specs = []
    for filename, file_meta in meta.files_metadata.items():
        for name, info in file_meta.tensors.items():
            specs.append(TensorSpec(name, SAFETENSORS_DTYPES[info.dtype], tuple(info.shape), Path(filename)))
    return specs, Resolved(config.parent, repo, revision, sha)
