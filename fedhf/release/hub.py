"""Hugging Face Hub: push a run's hub/ folder (``fedhf.tasks.adapters`` loads one back).

Artifacts first, network second: a run always leaves ``hub/`` on disk; pushing uploads that
folder as it is. The token comes from ``HF_TOKEN`` or huggingface_hub's login cache, never from
the run config, and never appears in output or errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedhf.errors import FedHFHubError, FedHFRunError
from fedhf.run.store import RunRecord, RunStore

REQUIRED = ("adapter_config.json", "adapter_model.safetensors", "README.md", "fedhf.json")


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
) -> PushResult:
    """Create the repo (if needed) and upload the run's hub/ folder in one commit."""
    import httpx
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
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
    files = sorted((p.relative_to(hub).as_posix(), p.stat().st_size) for p in hub.rglob("*") if p.is_file())
    if dry_run:
        return PushResult(repo_id, files, dry_run=True)
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
            folder_path=hub,
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
