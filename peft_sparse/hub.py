"""Save or push a peft_sparse adapter together with its model card.

``PeftModel.push_to_hub`` (transformers' ``PushToHubMixin``) uploads our adapters as they are, but
replaces the ``README.md`` that ``save_pretrained`` wrote by the card already on the Hub (or a
blank template), so the card would not describe the method. :func:`push_to_hub` saves the adapter,
writes the card (:func:`peft_sparse.model_card.write_model_card`) and uploads the folder.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional, Union

from huggingface_hub import CommitInfo, HfApi
from peft import PeftModel

from .model_card import write_model_card
from .training_log import LogHistory


def save_adapter(
    model: PeftModel,
    output_dir: Union[str, Path],
    training_metrics: Optional[dict[str, float]] = None,
    log_history: Optional[Union[LogHistory, str, Path]] = None,
    repo_id: Optional[str] = None,
) -> Path:
    """``model.save_pretrained(output_dir)`` plus the peft_sparse model card; returns ``output_dir``.

    Example:
        >>> save_adapter(model, "out", log_history=trainer.state.log_history)  # doctest: +SKIP
    """
    output_dir = Path(output_dir)
    model.save_pretrained(str(output_dir))
    write_model_card(model, output_dir, training_metrics=training_metrics, log_history=log_history, repo_id=repo_id)
    return output_dir


def push_to_hub(
    model: PeftModel,
    repo_id: str,
    *,
    training_metrics: Optional[dict[str, float]] = None,
    log_history: Optional[Union[LogHistory, str, Path]] = None,
    private: Optional[bool] = None,
    token: Optional[Union[str, bool]] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    commit_message: str = "Upload peft-sparse adapter",
) -> CommitInfo:
    """Create ``repo_id`` if needed and upload the adapter with its model card in one commit.

    Example:
        >>> import peft_sparse.hub
        >>> peft_sparse.hub.push_to_hub(model, "me/smollm2-sft-arithmetic",
        ...                             log_history=trainer.state.log_history)  # doctest: +SKIP
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        save_adapter(model, folder, training_metrics=training_metrics, log_history=log_history, repo_id=repo_id)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )
