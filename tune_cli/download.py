"""`tune download REPO_ID --output-dir DIR [--hf-token T] [--ignore-patterns P ...]`."""

from __future__ import annotations

from tunewright.tune_cli.catalog import UsageError

# Llama repos carry Meta's original consolidated .pth next to the HF safetensors we load.
DEFAULT_IGNORE = ["original/*"]


def cmd_download(args) -> int:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = args.repo_id
    url = f"https://huggingface.co/{repo}"
    try:
        path = snapshot_download(
            repo,
            local_dir=args.output_dir,
            token=args.hf_token,
            ignore_patterns=args.ignore_patterns or None,
        )
    except GatedRepoError:
        raise UsageError(
            f"{repo} is gated: accept its licence at {url}, then pass --hf-token or run "
            "`hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise UsageError(
            f"{repo} was not found on the Hugging Face Hub: check the id at {url}; a private "
            "repo needs --hf-token"
        ) from None
    except RevisionNotFoundError as e:
        raise UsageError(f"{repo}: {_first_line(e)}") from None
    except LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise UsageError(
                f"cannot download {repo}: offline mode is on (HF_HUB_OFFLINE=1) and it is not in "
                "the local cache; unset HF_HUB_OFFLINE, or copy the files here by other means"
            ) from None
        raise UsageError(
            f"cannot download {repo}: the Hugging Face Hub is unreachable ({_cause(e)}); check "
            "the network or proxy (HTTPS_PROXY), or copy the files here by other means"
        ) from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = "; the token is invalid or expired (check --hf-token)" if status == 401 else ""
        raise UsageError(f"cannot download {repo}: {_first_line(e)}{hint}") from None
    print(f"Downloaded {repo} to {path}")
    return 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _cause(e: BaseException) -> str:
    # huggingface_hub wraps the connection error; its first line reads "Got: ConnectError: ...".
    line = _first_line(e)
    return line.removeprefix("Got: ")
