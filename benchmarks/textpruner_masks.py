#!/usr/bin/env python
"""TextPruner's head and FFN masks for ``benchmarks/peers.py``, computed where TextPruner runs.

TextPruner 1.1 scores heads through the ``head_mask`` argument of transformers 4's models and removes them with
``prune_heads``; transformers 5 has neither. This script therefore runs in a virtual environment of its own, and
needs nothing from this repository:

    python -m venv outputs/peers-venv
    outputs/peers-venv/bin/pip install torch==2.13.0
    outputs/peers-venv/bin/pip install "transformers>=4.40,<4.50" textpruner safetensors

    outputs/peers-venv/bin/python benchmarks/textpruner_masks.py SCRATCH --heads 3 --ffn 288 --output masks.safetensors

``SCRATCH`` holds ``teacher/`` (a saved ``BertForSequenceClassification``) and ``batches.safetensors`` (the
batches TextPruner scores on, ``{index}.{input_ids,attention_mask,labels}``). TextPruner's own iterative pruning
(``TransformerPruningConfig(pruning_method="iterative", n_iters=4)``, even masking: the same number of heads and
FFN neurons in every layer) runs with ``keep_shape=True``; its final masks are written to ``--output``. The last
line printed is the JSON of the settings and versions used.
"""

import argparse
import json
import os
import tempfile

import textpruner
import torch
import transformers
from safetensors.torch import load_file, save_file
from textpruner import GeneralConfig, TransformerPruner, TransformerPruningConfig
from transformers import BertForSequenceClassification


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scratch")
    parser.add_argument("--heads", type=int, required=True, help="target_num_of_heads (per layer)")
    parser.add_argument("--ffn", type=int, required=True, help="target_ffn_size (per layer)")
    parser.add_argument("--n_iters", type=int, default=4)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    model = BertForSequenceClassification.from_pretrained(os.path.join(args.scratch, "teacher")).eval()
    tensors = load_file(os.path.join(args.scratch, "batches.safetensors"))
    batches = []
    for index in sorted({int(key.split(".")[0]) for key in tensors}):
        batches.append({key.split(".", 1)[1]: value for key, value in tensors.items() if key.startswith(f"{index}.")})
    settings = TransformerPruningConfig(
        target_ffn_size=args.ffn,
        target_num_of_heads=args.heads,
        pruning_method="iterative",
        n_iters=args.n_iters,
        head_even_masking=True,
        ffn_even_masking=True,
    )
    with tempfile.TemporaryDirectory() as output_dir:
        pruner = TransformerPruner(
            model,
            transformer_pruning_config=settings,
            general_config=GeneralConfig(use_device="cpu", output_dir=output_dir),
        )
        pruner.prune(dataloader=batches, adaptor=lambda outputs: outputs[0], keep_shape=True, save_model=False)
    save_file(
        {"head_mask": pruner.head_mask.float().contiguous(), "ffn_mask": pruner.ffn_mask.float().contiguous()},
        args.output,
    )
    print(
        json.dumps(
            {
                "textpruner_version": textpruner.__version__,
                "transformers_version": transformers.__version__,
                "torch_version": torch.__version__,
                "target_num_of_heads": args.heads,
                "target_ffn_size": args.ffn,
                "n_iters": args.n_iters,
                "scored_batches": len(batches),
            }
        )
    )


if __name__ == "__main__":
    main()
