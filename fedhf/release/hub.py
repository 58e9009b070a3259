"""Hugging Face Hub: push a run's hub/ folder (``fedhf.tasks.adapters`` loads one back).

Artifacts first, network second: a run always leaves ``hub/`` on disk; pushing uploads that
folder as it is. The token comes from ``HF_TOKEN`` or huggingface_hub's login cache, never from
the run config, and never appears in output or errors.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fedhf.errors import FedHFHubError, FedHFRunError
from fedhf.run.store import RunRecord, RunStore

REQUIRED = ("adapter_config.json", "adapter_model.safetensors", "README.md", "fedhf.json")
EXPORT_FORMATS = ("int8", "onnx", "onnx-int8")  # fedhf export's, each in RUN_DIR/export/FORMAT/


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


@dataclass
class PushResult:
    repo_id: str
    files: list[tuple[str, int]]
    commit_url: str | None = None
    pr_url: str | None = None
    dry_run: bool = False


def hub_folder(run_dir: str | Path) -> tuple[Path, RunRecord]:
    """The hub/ folder of a finished run, checked."""
    run_dir = Path(run_dir)
    store = RunStore(run_dir)
    if not store.exists():
        raise FedHFHubError(f"'{run_dir}' is not a fedhf run folder (no run.json).")
    try:
        run = store.read()
    except FedHFRunError as exc:
        raise FedHFHubError(f"{exc} There is nothing trustworthy to publish.") from None
    if run.status != "complete":
        raise FedHFHubError(f"'{run_dir}' is not a finished run (status '{run.status}'); push only complete runs.")
    hub = run_dir / "hub"
    missing = [name for name in REQUIRED if not (hub / name).is_file()]
    if missing:
        raise FedHFHubError(f"'{hub}' lacks {', '.join(missing)}; the run has no complete adapter to publish.")
    return hub, run


def push(
    run_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    dry_run: bool = False,
    exports: tuple[str, ...] = (),
) -> PushResult:
    """Create the repo (if needed) and upload the run's hub/ folder in one commit; ``exports``: formats of
    ``fedhf export`` to publish with it, under export/FORMAT/ with their sections added to the card."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    hub, run = hub_folder(run_dir)
    if create_pr and revision:
        raise FedHFHubError(
            "--create-pr opens a pull request against the default branch; drop --revision, or push to "
            "the branch without --create-pr."
        )
    try:
        validate_repo_id(repo_id)
        if "/" not in repo_id:
            raise HFValidationError("it must be 'namespace/name'")
    except HFValidationError as exc:
        raise FedHFHubError(
            f"--repo-id '{repo_id}' is not a valid Hub repo id ({str(exc).splitlines()[0][:160]}); "
            f"use namespace/name, e.g. my-org/fedhf-sst2."
        ) from None
    with _staged(hub, Path(run_dir), exports) as folder:
        files = sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())
        if dry_run:
            return PushResult(repo_id, files, dry_run=True)
        return _upload(folder, run, repo_id, files, private=private, revision=revision, create_pr=create_pr)


@contextlib.contextmanager
def _staged(hub: Path, run_dir: Path, exports: tuple[str, ...]) -> Iterator[Path]:
    """hub/ itself, or (with exports) a temporary copy of it with each export under export/FORMAT/ and its card
    section (the export's own README.md, written by ``fedhf export``) appended to the model card."""
    if not exports:
        yield hub
        return
    for fmt in exports:
        if fmt not in EXPORT_FORMATS:
            raise FedHFHubError(f"--export: got {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}.")
        if not (run_dir / "export" / fmt / "README.md").is_file():
            raise FedHFHubError(
                f"--export {fmt}: the run has no finished {fmt} export ({run_dir / 'export' / fmt}); run "
                f"`fedhf export {run_dir} --format {fmt}` first."
            )
    with tempfile.TemporaryDirectory(prefix="fedhf-push-") as tmp:
        folder = Path(tmp) / "hub"
        shutil.copytree(hub, folder)
        card = (folder / "README.md").read_text()
        for fmt in dict.fromkeys(exports):
            shutil.copytree(run_dir / "export" / fmt, folder / "export" / fmt)
            (folder / "export" / fmt / "README.md").unlink()  # its text goes in the card
            card = card.rstrip("\n") + "\n\n" + (run_dir / "export" / fmt / "README.md").read_text()
        (folder / "README.md").write_text(card)
        yield folder


def _upload(
    folder: Path,
    run: RunRecord,
    repo_id: str,
    files: list[tuple[str, int]],
    *,
    private: bool,
    revision: str | None,
    create_pr: bool,
) -> PushResult:
    import httpx
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    token = get_token()
    if not token:
        raise FedHFHubError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login`.")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            create_pr=create_pr,
            commit_message=f"fedhf run {run.run_id}",
            repo_type="model",
        )
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        first = (_scrub(str(exc), token).splitlines() or [""])[0][:200]
        raise FedHFHubError(f"the Hub refused the upload to '{repo_id}' (HTTP {status}): {first}") from None
    except (httpx.HTTPError, OSError) as exc:  # connection errors: httpx's are not OSErrors
        raise FedHFHubError(
            f"cannot reach the Hub at {_endpoint()} to push '{repo_id}' ({type(exc).__name__}); check "
            "HF_ENDPOINT and the network, then run fedhf push again."
        ) from None
    return PushResult(
        repo_id, files, commit_url=getattr(info, "commit_url", None), pr_url=getattr(info, "pr_url", None)
    )
