"""`covspec publish`: push an exported part (today: a drafter) to the Hugging Face Hub with a card.

    covspec publish checkpoints/toy-drafter --repo-id my-org/toy-drafter \\
        --base-model llava-hf/llava-1.5-7b-hf --dry-run      # writes checkpoints/toy-drafter.publish-dry-run/
    covspec publish checkpoints/toy-drafter --repo-id my-org/toy-drafter \\
        --base-model llava-hf/llava-1.5-7b-hf --private      # HF_TOKEN, --token or `hf auth login`

    >>> publish("checkpoints/toy-drafter", "my-org/toy-drafter", dry_run=True,
    ...         base_model="llava-hf/llava-1.5-7b-hf").summary()

The source folder is never modified: its files (safetensors weights only, pickle refused) are
staged with a generated README.md (`covspec.training.model_card`) into a sibling folder, which a
dry run keeps for inspection and a real run uploads with `HfApi.create_repo` + `upload_folder`
and then deletes. The card's `base_model` is the target recorded in config.json unless
--base-model overrides it; a target recorded as a local path needs --base-model. Every refusal
is a `PublishError` (a ValueError), one line naming the value. No Lightning is imported.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import validate_repo_id

from covspec.training.model_card import (
    CardError,
    ExportedPart,
    build_card,
    check_card,
    folder_files,
)

WEIGHTS = ("model.safetensors", "model.safetensors.index.json")  # one of them is required
# what an exported folder holds: weights, configs, card, tokenizer files; nothing else goes up
# (a pickle by any name, an optimizer state, a script a loader might run)
ALLOWED_SUFFIXES = (".safetensors", ".json", ".md", ".txt", ".jinja", ".model", ".tiktoken")
DRY_RUN_SUFFIX = ".publish-dry-run"


class PublishError(ValueError):
    """A refusal of `covspec publish`: one line, naming the offending value."""


@dataclass
class PublishResult:
    staging: Path  # the dry-run folder, or the (deleted) upload staging folder
    files: list[tuple[str, int]]  # (path in repo, bytes)
    dry_run: bool
    url: str | None = None  # commit URL after an upload
    metadata: dict = field(default_factory=dict)  # the card's YAML, as huggingface_hub parses it

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def summary(self) -> str:
        width = max(len(name) for name, _ in self.files)
        lines = [f"  {name:<{width}}  {size:>14,} B" for name, size in self.files]
        lines.append(f"  total: {self.total_bytes:,} bytes in {len(self.files)} files")
        head = f"dry run: wrote {self.staging}" if self.dry_run else f"uploaded: {self.url}"
        return "\n".join([head, *lines])


def source_files(folder: Path) -> list[Path]:
    """Files to publish (relative paths; hidden ones and the old README.md left out), checked."""
    if not folder.is_dir():
        raise PublishError(f"folder not found: {folder}")
    files = sorted(
        p.relative_to(folder)
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    others = [str(p) for p in files if p.suffix.lower() not in ALLOWED_SUFFIXES]
    if others:
        raise PublishError(
            f"{folder} holds files that are not safetensors, configs or tokenizer files "
            f"{others[:5]}: publish safetensors only (remove or move them)"
        )
    names = {str(p) for p in files}
    if "config.json" not in names:
        raise PublishError(f"{folder} has no config.json: not an exported HF folder")
    if not names & set(WEIGHTS):
        raise PublishError(f"{folder} has no model.safetensors: nothing to publish")
    if "metrics.json" not in names:
        raise PublishError(f"{folder} has no metrics.json: the card's model-index comes from it")
    return [p for p in files if str(p) != "README.md"]


def is_local_path(value: str, folder: Path) -> bool:
    """A target given as a folder (absolute, ./, ~, not a Hub id, or existing here) not a Hub id."""
    if value.startswith(("/", ".", "~")) or "\\" in value:
        return True
    try:
        validate_repo_id(value)
    except ValueError:
        return True
    roots = [Path.cwd(), *folder.resolve().parents]
    return any((root / value).exists() for root in roots)


def resolve_base_model(cli_value: str | None, part: ExportedPart, folder: Path) -> str:
    """--base-model, else the target recorded in config.json (else the recipe's model.target)."""
    model = (part.recipe or {}).get("model") or {}
    recorded = part.config.get("target_name_or_path") or (
        model.get("target") if isinstance(model, dict) else None
    )
    if cli_value:
        try:
            validate_repo_id(cli_value)
        except ValueError:
            raise PublishError(
                f"--base-model {cli_value!r} is not a Hub model id (ORG/NAME)"
            ) from None
        if recorded and not is_local_path(str(recorded), folder) and recorded != cli_value:
            raise PublishError(
                f"--base-model {cli_value!r} is not the target this drafter was trained for "
                f"({recorded!r}, in {folder}/config.json)"
            )
        return cli_value
    if not recorded:
        raise PublishError(
            f"{folder}/config.json records no target: pass --base-model with the Hub id of the target"
        )
    if is_local_path(str(recorded), folder):
        raise PublishError(
            f"the target {recorded!r} is a local path: pass --base-model with the Hub id of the target"
        )
    return str(recorded)


def _place(src: Path, dst: Path, link: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:  # upload staging: a hard link costs no space and is never written to
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def stage(
    folder: Path, out: Path, files: list[Path], card: str, link: bool
) -> list[tuple[str, int]]:
    """Write the files plus the generated README.md into `out`; (name, bytes) of each, sorted."""
    out.mkdir(parents=True, exist_ok=True)
    for rel in files:
        _place(folder / rel, out / rel, link)
    (out / "README.md").write_text(card, encoding="utf-8")
    names = sorted([*(str(p) for p in files), "README.md"])
    return [(name, (out / name).stat().st_size) for name in names]


def _identity(folder: Path) -> tuple[int, int]:
    st = folder.stat()
    return st.st_dev, st.st_ino


def _check_unchanged(folder: Path, identity: tuple[int, int]) -> None:
    """An export swaps a whole new folder in under the same name (modeling/outputs.py): if
    the name now points at another folder, the card (read before) and the staged weights
    (linked after) may come from two exports. Checked after staging: the staged files are
    hard links, so a folder still the same here is the one every staged file came from."""
    try:
        same = _identity(folder) == identity
    except FileNotFoundError:
        same = False
    if not same:
        raise PublishError(
            f"{folder} was replaced while it was being published (an export finished "
            "meanwhile): nothing was uploaded; run publish again"
        )


def _dry_run_dir(folder: Path, repo_id: str, dry_run_dir: str | None) -> Path:
    out = (
        Path(dry_run_dir)
        if dry_run_dir
        else folder.parent / f"{repo_id.split('/')[-1]}{DRY_RUN_SUFFIX}"
    )
    src, dst = folder.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise PublishError(f"dry-run folder {out} is, holds or is inside the source {folder}")
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not out.name.endswith(DRY_RUN_SUFFIX)):
            raise PublishError(f"dry-run folder {out} exists and is not empty: remove it first")
        shutil.rmtree(out)
    return out


def _checked(card_path: Path, base_model: str, model_type: str) -> dict:
    try:
        return check_card(card_path, base_model=base_model, model_type=model_type)
    except CardError as e:
        raise PublishError(str(e)) from None


def _staging_dir(folder: Path) -> tempfile.TemporaryDirectory:
    """A temporary sibling of the folder (same disk, so weights hard-link), else a system one."""
    try:
        return tempfile.TemporaryDirectory(
            prefix=f".{folder.name}.publish-", dir=folder.resolve().parent
        )
    except OSError:
        return tempfile.TemporaryDirectory(prefix="covspec-publish-")


def _exists(api: HfApi, repo_id: str) -> bool:
    try:
        api.repo_info(repo_id)
    except HfHubHTTPError:
        return False
    return True


def upload(
    staging: Path, repo_id: str, *, token: str, private: bool, exist_ok: bool, message: str
) -> str:
    """create_repo (a 409 without --exist-ok is refused) then upload_folder; the commit URL.
    An existing repo is replaced whole (its other files deleted in the same commit) and must
    already be private when --private is asked; a repo this call created is deleted again when
    the upload fails (e.g. the Hub refuses the card), never left empty."""
    if constants.is_offline_mode():
        raise PublishError("HF_HUB_OFFLINE is set: unset it to upload, or pass --dry-run")
    api = HfApi(token=token)
    created = True
    try:  # private=None keeps the account's default visibility unless --private
        api.create_repo(repo_id, private=True if private else None)
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        # a token that may write to an existing repo but not create one gets 401-403
        exists = status == 409 or (exist_ok and status in (401, 402, 403) and _exists(api, repo_id))
        if not exists:
            raise PublishError(f"creating {repo_id} failed: {str(e).splitlines()[0]}") from None
        if not exist_ok:
            raise PublishError(
                f"repo {repo_id} already exists on the Hub: pass --exist-ok to add a commit to it"
            ) from None
        created = False
    if not created and private and not api.repo_info(repo_id).private:
        raise PublishError(
            f"repo {repo_id} exists and is public: --private cannot apply to it; make it "
            "private on the Hub first, or publish without --private"
        )
    try:
        info = api.upload_folder(
            repo_id=repo_id, folder_path=staging, commit_message=message,
            delete_patterns=None if created else "*",  # no stale weights beside the new card
        )  # fmt: skip
    except (HfHubHTTPError, ValueError) as e:  # ValueError: the Hub refused the card's YAML
        undone = ""
        if created:
            try:
                api.delete_repo(repo_id, missing_ok=True)
                undone = "; the repo it had created was deleted"
            except HfHubHTTPError:
                undone = f"; the repo it had created could not be deleted: remove {repo_id}"
        why = " ".join(str(e).split())  # the Hub's card verdict spans lines
        raise PublishError(f"uploading to {repo_id} failed: {why}{undone}") from None
    return info.commit_url


def publish(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    dry_run_dir: str | None = None,
    exist_ok: bool = False,
    base_model: str | None = None,
    license: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> PublishResult:
    """Check the folder, build and validate the card, then write the dry run or upload."""
    folder = Path(folder)
    try:
        validate_repo_id(repo_id)
    except ValueError:
        raise PublishError(f"--repo-id {repo_id!r} is not a Hub repo id (ORG/NAME)") from None
    identity = _identity(folder) if folder.is_dir() else None
    files = source_files(folder)
    try:
        part = folder_files(folder)
        base = resolve_base_model(base_model, part, folder)
        card = build_card(part, repo_id=repo_id, base_model=base, license=license)
    except CardError as e:
        raise PublishError(str(e)) from None
    model_type = str(part.config.get("model_type"))
    if dry_run:
        out = _dry_run_dir(folder, repo_id, dry_run_dir)
        listing = stage(folder, out, files, card, link=False)
        _check_unchanged(folder, identity)
        meta = _checked(out / "README.md", base, model_type)
        return PublishResult(out, listing, dry_run=True, metadata=meta)
    token = token or get_token()
    if not token:
        raise PublishError(
            "no Hugging Face token: pass --token, set HF_TOKEN or run `hf auth login`"
        )
    message = commit_message or f"covspec publish: {model_type} from {folder.name}"
    with _staging_dir(folder) as tmp:
        listing = stage(folder, Path(tmp), files, card, link=True)
        _check_unchanged(folder, identity)
        meta = _checked(Path(tmp) / "README.md", base, model_type)
        url = upload(
            Path(tmp), repo_id, token=token, private=private, exist_ok=exist_ok, message=message
        )
        return PublishResult(Path(tmp), listing, dry_run=False, url=url, metadata=meta)
