"""Upload a peft_sparse adapter to the Hugging Face Hub with a model card that describes it.

    python examples/push_to_hub.py me/smollm2-sft-arithmetic --adapter outputs/sft-arithmetic
    python examples/push_to_hub.py me/smollm2-sft-arithmetic --adapter outputs/sft-arithmetic --dry-run

--adapter is a folder written by save_pretrained (e.g. by examples/sft_arithmetic.py); without it a
fresh, untrained SFT adapter is made, to try the flow. Training metrics come from --log-history
(a trainer_state.json or a checkpoint folder; by default the adapter folder's own, if it has one).
--dry-run writes the folder that would be uploaded to --output-dir and prints its model card; a real
upload needs `hf auth login` (or HF_TOKEN) first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import peft_sparse
import peft_sparse.hub
from peft_sparse.training_log import TRAINER_STATE_NAME


def load_base_model(model: str | None):
    if model:
        return AutoModelForCausalLM.from_pretrained(model)
    from arithmetic_task import load_model_and_tokenizer  # the embedded SmolLM2-135M (examples/ is on sys.path)

    return load_model_and_tokenizer(None)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo_id", help="Hub repository, e.g. me/smollm2-sft-arithmetic")
    parser.add_argument("--adapter", help="saved adapter folder (default: a fresh SFT adapter)")
    parser.add_argument("--model", default=None, help="base causal LM id or path (default: embedded SmolLM2-135M)")
    parser.add_argument("--log-history", help="trainer_state.json or checkpoint folder with the training metrics")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--dry-run", action="store_true", help="write the upload folder and print its card only")
    parser.add_argument("--output-dir", default="outputs/push-to-hub", help="where --dry-run writes the folder")
    args = parser.parse_args()

    base = load_base_model(args.model)
    if args.adapter:
        model = PeftModel.from_pretrained(base, args.adapter)
    else:
        print("no --adapter: uploading a fresh, untrained SFT adapter (density 1%)")
        model = get_peft_model(base, peft_sparse.SparseConfig(density=0.01, task_type="CAUSAL_LM"))
    log_history = args.log_history
    if log_history is None and args.adapter and (Path(args.adapter) / TRAINER_STATE_NAME).is_file():
        log_history = args.adapter

    if args.dry_run:
        folder = peft_sparse.hub.save_adapter(model, args.output_dir, log_history=log_history, repo_id=args.repo_id)
        print(f"would upload {sorted(path.name for path in folder.iterdir())} to {args.repo_id}\n")
        print((folder / "README.md").read_text())
        return
    commit = peft_sparse.hub.push_to_hub(model, args.repo_id, log_history=log_history, private=args.private)
    print(f"uploaded: {commit.commit_url}")


if __name__ == "__main__":
    main()
