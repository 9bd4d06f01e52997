#!/usr/bin/env python
"""RMT-KD against the structured-pruning tools users know (issue #18), at equal size and equal distillation.

From the converged MiniLM-L6 teacher of ``minilm_movie_reviews.py``, every arm

1. keeps the same vocabulary (the training split's tokens, the trainer's ``trim_vocabulary`` rule),
2. is cut to the parameter count of one of RMT-KD's frontier points (``q0.5``: one-shot at σ² quantile 0.5;
   ``t0.34``: the mildest quantile that keeps at most 34% of the parameters), ±1%, by its own criterion:

   * ``rmt-kd``: ``benchmarks/frontier_point.py`` (eigenvectors above the Marchenko–Pastur edge);
   * ``torch-pruning-magnitude`` / ``torch-pruning-taylor``: Torch-Pruning's recipe for Hugging Face BERT
     (``examples/transformers/prune_hf_bert.py``): ``BasePruner`` with group L2-magnitude or Taylor importance,
     a uniform ratio per layer (``global_pruning=False``), one step, hidden size, FFN and whole heads pruned at the
     same ratio (head size kept), the classifier ignored; the ratio is bisected to the parameter count;
   * ``textpruner``: TextPruner's ``TransformerPruner`` (FFN neurons and heads; it does not prune the hidden size);

3. is distilled the same way: 600 steps, ``α·CE + (1 − α)·T²·KL`` with α = 0.7, T = 1, lr 1e-4, batch 32, and the
   hidden-state term (β = 1) against the teacher's hidden states in the arm's kept basis (a channel selection for
   the pruners, identity where the hidden size is untouched), through ``RMTKDTrainer.distil``;
4. is scored like a user meets it: validation and test accuracy of the raw text through the trimmed tokenizer.

    python benchmarks/peers.py --work_dir outputs/bench            # every missing run, 3 seeds, then latency + tables
    python benchmarks/peers.py --methods torch-pruning-magnitude --points q0.5 --seeds 0
    python benchmarks/peers.py --tables_only                       # peers.md and the plot from peers.json

Results: ``benchmarks/results/peers.json`` (``{"points": [...]}``, one object per run), ``peers.md``, ``peers.png``.
Nothing is chosen on the test split.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertForSequenceClassification

import rmt_kd_hf  # noqa: F401  (registers the RMTBert auto classes)
from rmt_kd_hf.data import default_teacher_path, load_movie_reviews
from rmt_kd_hf.surgery.base import count_parameters
from rmt_kd_hf.vocabulary import (
    TokenIdRemapCollator,
    dataset_token_ids,
    trim_embeddings,
    trim_tokenizer,
    vocabulary_to_keep,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import frontier_point  # noqa: E402
from minilm_movie_reviews import trainer_for  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RESULTS = os.path.join(RESULTS_DIR, "peers.json")
METHODS = ("rmt-kd", "torch-pruning-magnitude", "torch-pruning-taylor", "textpruner")
POINTS = {"q0.5": {"quantile": 0.5, "target_ratio": None}, "t0.34": {"quantile": 0.5, "target_ratio": 0.34}}
DISTILLATION = {"steps": 600, "hidden_weight": 1.0, "learning_rate": 1e-4, "alpha": 0.7, "temperature": 1.0}
MAX_LENGTH = 64
PARAMETER_TOLERANCE = 0.01
STRUCTURE_FILENAME = "peers_structure.json"


# -- Torch-Pruning ------------------------------------------------------------------------------------------------


def torch_pruning_prune(
    model: BertForSequenceClassification,
    ratio: float,
    importance: str,
    example_inputs: dict[str, torch.Tensor],
    gradients: dict[str, torch.Tensor] | None = None,
) -> BertForSequenceClassification:
    """A copy of ``model`` pruned by Torch-Pruning at ``ratio`` (hidden size, FFN and heads alike), with its
    attention modules and config updated to the new shapes (so ``save_pretrained``/``from_pretrained`` work).

    ``importance``: ``"magnitude"`` (group L2) or ``"taylor"`` (first-order Taylor, reading ``gradients``:
    :func:`task_gradients` of ``model``)."""
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    attention_layers = [layer.attention.self for layer in model.bert.encoder.layer]
    num_heads = {}
    for attention in attention_layers:
        for projection in (attention.query, attention.key, attention.value):
            num_heads[projection] = attention.num_attention_heads
    criterion = (
        tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
        if importance == "magnitude"
        else tp.importance.GroupTaylorImportance()
    )
    pruner = tp.pruner.BasePruner(
        model,
        example_inputs,
        importance=criterion,
        global_pruning=False,  # the example's uniform ratio per layer: the result stays a regular BERT
        iterative_steps=1,
        pruning_ratio=ratio,
        num_heads=num_heads,
        prune_head_dims=False,
        prune_num_heads=True,
        head_pruning_ratio=ratio,
        output_transform=lambda outputs: outputs.logits.sum(),
        ignored_layers=[model.classifier],
    )
    if importance == "taylor":
        for name, parameter in model.named_parameters():
            parameter.grad = None if gradients is None or name not in gradients else gradients[name].clone()
    pruner.step()
    model.zero_grad(set_to_none=True)
    if min(pruner.num_heads[attention.query] for attention in attention_layers) == 0:
        raise ValueError(f"pruning ratio {ratio:.4f} leaves a layer without heads")
    for attention in attention_layers:
        attention.num_attention_heads = pruner.num_heads[attention.query]
        attention.all_head_size = attention.query.out_features
        attention.attention_head_size = attention.all_head_size // attention.num_attention_heads
    config = model.config
    config.hidden_size = model.bert.embeddings.word_embeddings.embedding_dim
    config.intermediate_size = model.bert.encoder.layer[0].intermediate.dense.out_features
    config.num_attention_heads = attention_layers[0].num_attention_heads
    return model


def task_gradients(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Gradients of the task loss summed over ``batches`` (which carry ``labels``), by parameter name: what
    Torch-Pruning's Taylor importance reads, computed once for every ratio the bisection tries."""
    model.zero_grad(set_to_none=True)
    for batch in batches:
        model(**batch).loss.backward()
    gradients = {
        name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None
    }
    model.zero_grad(set_to_none=True)
    return gradients


def kept_channels(original: nn.Embedding, pruned: nn.Embedding) -> torch.Tensor:
    """The original hidden channels a pruned embedding kept, in order: (new width,) indices."""
    columns = {tuple(original.weight[:8, index].tolist()): index for index in range(original.embedding_dim)}
    return torch.tensor([columns[tuple(pruned.weight[:8, index].tolist())] for index in range(pruned.embedding_dim)])


def selection_bases(channels: torch.Tensor, old_width: int, num_states: int) -> list[torch.Tensor]:
    """``num_states`` copies of the (new width, old width) matrix that selects ``channels``."""
    basis = torch.zeros(len(channels), old_width)
    basis[torch.arange(len(channels)), channels] = 1.0
    return [basis] * num_states


def parameters_after_trim(model: nn.Module, kept_vocabulary: int) -> int:
    """Parameters once the word embeddings keep ``kept_vocabulary`` rows."""
    embeddings = model.get_input_embeddings()
    return count_parameters(model) - (embeddings.num_embeddings - kept_vocabulary) * embeddings.embedding_dim


def bisect_ratio(
    prune: Callable[[float], nn.Module], parameters: Callable[[nn.Module], int], target: int, steps: int = 20
) -> tuple[nn.Module, float]:
    """The pruned model whose parameter count is within ``PARAMETER_TOLERANCE`` of ``target`` (ratio bisected)."""
    low, high = 0.0, 0.95
    best = None
    for _ in range(steps):
        ratio = (low + high) / 2
        try:
            model = prune(ratio)
        except ValueError:  # nothing left somewhere: too strong a cut
            high = ratio
            continue
        count = parameters(model)
        if best is None or abs(count - target) < abs(best[2] - target):
            best = (model, ratio, count)
        if abs(count - target) <= PARAMETER_TOLERANCE * target:
            break
        low, high = (ratio, high) if count > target else (low, ratio)
    if best is None:
        raise ValueError(f"no pruning ratio gives {target} parameters: every tried ratio left a layer empty")
    model, ratio, count = best
    if abs(count - target) > PARAMETER_TOLERANCE * target:
        raise ValueError(f"no pruning ratio gives {target} parameters ±1% (closest: {count} at {ratio:.4f})")
    return model, ratio


# -- TextPruner ---------------------------------------------------------------------------------------------------
# TextPruner 1.1 was written for transformers 4.x: its TransformerPruner scores heads through the models'
# ``head_mask`` argument and removes them with ``prune_heads``, both gone from transformers 5. Its criterion (the
# masks) is therefore computed by ``textpruner_masks.py`` in a virtual environment of its own
# (``outputs/peers-venv``: torch 2.13, transformers 4.49, textpruner), and the masks are applied here.

PEERS_VENV_PYTHON = os.path.join("outputs", "peers-venv", "bin", "python")


def textpruner_environment_ready() -> bool:
    """Whether ``outputs/peers-venv`` exists with TextPruner installed."""
    import glob

    return bool(glob.glob(os.path.join("outputs", "peers-venv", "lib", "python*", "site-packages", "textpruner")))


TEXTPRUNER_SETTINGS = {"pruning_method": "iterative", "n_iters": 4, "head_even_masking": True, "ffn_even_masking": True}


def textpruner_sizes(teacher: BertForSequenceClassification, kept_vocabulary: int, target: int) -> tuple[int, int]:
    """(heads, FFN size) per layer that keep about the same fraction of heads and of FFN neurons and meet
    ``target`` parameters, the hidden size untouched; ``ValueError`` when nothing that small exists."""
    config = teacher.config
    layers, hidden = config.num_hidden_layers, config.hidden_size
    head = _head_parameters(hidden, hidden // config.num_attention_heads)
    full_layer = config.num_attention_heads * head + _ffn_parameters(hidden, config.intermediate_size)
    fixed = parameters_after_trim(teacher, kept_vocabulary) - layers * full_layer
    budget = (target - fixed) / layers
    heads = max(1, round(config.num_attention_heads * budget / full_layer))
    ffn = int((budget - heads * head - hidden) / (2 * hidden + 1))
    if ffn < 1:
        smallest = fixed + layers * (head + _ffn_parameters(hidden, 1))
        raise ValueError(
            f"{target:,} parameters are out of reach when the hidden size stays {hidden}: with this vocabulary the "
            f"smallest such model (one head and one FFN neuron per layer) has {smallest:,}"
        )
    return heads, ffn


def _head_parameters(hidden: int, head_size: int) -> int:
    """Query, key, value (weights, biases) and the output projection's columns of one head."""
    return 3 * (hidden * head_size + head_size) + hidden * head_size


def _ffn_parameters(hidden: int, size: int) -> int:
    return 2 * hidden * size + size + hidden


def apply_head_and_ffn_masks(
    model: BertForSequenceClassification, head_mask: torch.Tensor, ffn_mask: torch.Tensor
) -> BertForSequenceClassification:
    """A copy of ``model`` without the heads and FFN neurons whose mask entry is 0: (layers, heads) and
    (layers, intermediate size) tensors of 0/1. The head size is kept, so the result has fewer heads per layer
    than ``hidden_size / head size``: transformers 5's ``BertConfig`` cannot describe it."""
    model = copy.deepcopy(model)
    for layer, heads, neurons in zip(model.bert.encoder.layer, head_mask.bool(), ffn_mask.bool(), strict=True):
        attention = layer.attention.self
        head_size = attention.attention_head_size
        rows = torch.cat([torch.arange(head * head_size, (head + 1) * head_size) for head in heads.nonzero()[:, 0]])
        for projection in (attention.query, attention.key, attention.value):
            _keep_rows(projection, rows)
        _keep_columns(layer.attention.output.dense, rows)
        attention.num_attention_heads = int(heads.sum())
        attention.all_head_size = len(rows)
        kept = neurons.nonzero()[:, 0]
        _keep_rows(layer.intermediate.dense, kept)
        _keep_columns(layer.output.dense, kept)
    return model


def _keep_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    with torch.no_grad():
        linear.weight = nn.Parameter(linear.weight[rows].clone())
        linear.bias = nn.Parameter(linear.bias[rows].clone())
    linear.out_features = len(rows)


def _keep_columns(linear: nn.Linear, columns: torch.Tensor) -> None:
    with torch.no_grad():
        linear.weight = nn.Parameter(linear.weight[:, columns].clone())
    linear.in_features = len(columns)


# -- the runs ------------------------------------------------------------------------------------------------------


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="outputs/bench")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--points", nargs="+", choices=list(POINTS), default=list(POINTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--scoring_batches",
        type=int,
        default=None,
        help="batches of 32 that Taylor and TextPruner score on (default: as many rows as RMT-KD calibrates on, "
        "10%% of the training split)",
    )
    parser.add_argument("--latency_rounds", type=int, default=5, help="alternating teacher/arm rounds; 0: skip")
    parser.add_argument("--tables_only", action="store_true", help="rewrite peers.md and peers.png from peers.json")
    return parser.parse_args(argv)


def load_results() -> dict:
    if not os.path.exists(RESULTS):
        return {"points": []}
    with open(RESULTS) as file:
        return json.load(file)


def save_results(results: dict) -> None:
    with open(RESULTS, "w") as file:
        json.dump(results, file, indent=2)


def rmt_kd_point(point: str, seed: int, work_dir: str) -> dict:
    """The frontier point of ``frontier_point.py`` at ``point`` and ``seed`` from the current converged teacher,
    read from ``frontier_points.jsonl`` when that exact run exists, else run now (it appends it there)."""
    settings = POINTS[point]
    argv = ["--work_dir", work_dir, "--seed", str(seed), "--steps", str(DISTILLATION["steps"])]
    argv += ["--target_ratio", str(settings["target_ratio"])] if settings["target_ratio"] else ["--quantile", "0.5"]
    _, teacher = frontier_point.converged_teacher(work_dir)
    fingerprint = frontier_point.model_fingerprint(teacher)
    for line in open(frontier_point.RESULTS):
        run = json.loads(line)
        same = (
            run.get("teacher_fingerprint") == fingerprint
            and run["kind"] == "point"
            and run["seed"] == seed
            and run["steps"] == DISTILLATION["steps"]
            and run["target_parameter_ratio"] == settings["target_ratio"]
            and (settings["target_ratio"] is not None or run["quantile"] == settings["quantile"])
            and run["hidden_distillation_weight"] == DISTILLATION["hidden_weight"]
            and run["learning_rate"] == DISTILLATION["learning_rate"]
            and run["distillation_alpha"] == DISTILLATION["alpha"]
            and run["distillation_temperature"] == DISTILLATION["temperature"]
            and not run.get("keep_best_every")
            and run.get("compression_schedule", "one_shot") == "one_shot"
            and not run.get("sigma_quantile_shifts")
            and run.get("head_size_rule") == frontier_point.HEAD_SIZE_RULE
        )
        if same:
            return run
    return frontier_point.main(argv)


def peer_point(method: str, point: str, seed: int, target: int, args: argparse.Namespace) -> dict:
    """One peer arm: trim the vocabulary, prune to ``target`` parameters, distil, save, score."""
    start = time.perf_counter()
    teacher_dir, teacher = frontier_point.converged_teacher(args.work_dir)
    tokenizer = AutoTokenizer.from_pretrained(default_teacher_path())
    reviews = load_movie_reviews(seed=0)
    data = reviews.map(
        lambda batch: tokenizer(batch["sentence"], truncation=True, max_length=MAX_LENGTH),
        batched=True,
        remove_columns=["sentence"],
    )
    teacher_scores = frontier_point.teacher_record(teacher_dir, teacher, tokenizer, reviews, MAX_LENGTH)
    teacher_parameters = count_parameters(teacher)  # before the vocabulary trim, as RMT-KD's param_reduction
    kept_tokens = vocabulary_to_keep(tokenizer, dataset_token_ids(data["train"]))
    teacher = trim_embeddings(teacher.eval(), kept_tokens)  # every arm cuts from the same trimmed teacher
    output_dir = os.path.join(args.work_dir, "peers", f"{method}_{point}_s{seed}")
    trainer = trainer_for(
        teacher,
        data,
        tokenizer,
        output_dir,
        seed,
        stage_max_steps=DISTILLATION["steps"],
        max_steps=DISTILLATION["steps"],
        hidden_distillation_weight=DISTILLATION["hidden_weight"],
        learning_rate=DISTILLATION["learning_rate"],
        distillation_alpha=DISTILLATION["alpha"],
        distillation_temperature=DISTILLATION["temperature"],
        trim_vocabulary=False,
        measure_latency=False,
    )
    trainer.data_collator = TokenIdRemapCollator(trainer.data_collator, kept_tokens, tokenizer.unk_token_id)
    row = {"method": method, "point": point, "seed": seed, "target_parameters": target}
    try:
        student, settings, bases = prune(method, teacher, trainer, target, len(kept_tokens), seed, args)
    except (ValueError, RuntimeError, ImportError) as error:
        return {**row, "status": f"could not run: {error}", "test_accuracy": None, "validation_accuracy": None}
    trainer.model = student  # the cut alone, before any training: how much the criterion itself keeps
    before = trainer.evaluate(metric_key_prefix="before_distillation")["before_distillation_accuracy"]
    trainer.model = teacher
    torch.manual_seed(seed)
    trainer.distil(student, teacher, bases)
    student = trainer.model.eval()
    trimmed_tokenizer = trim_tokenizer(tokenizer, kept_tokens)
    loads = save_arm(student, trimmed_tokenizer, output_dir)
    parameters = count_parameters(student)
    return {
        **row,
        "status": "ok",
        "settings": settings,
        "parameters": parameters,
        "param_reduction": 1 - parameters / teacher_parameters,
        **frontier_point.split_accuracies(student, trimmed_tokenizer, reviews, MAX_LENGTH),
        "validation_accuracy_before_distillation": before,
        "loads_with_from_pretrained": loads,
        "checkpoint": output_dir,
        **teacher_scores,
        "seconds": time.perf_counter() - start,
    }


def prune(method: str, teacher, trainer, target: int, kept_vocabulary: int, seed: int, args) -> tuple:
    """(student, its settings, hidden-state bases) for a peer ``method`` cut to ``target`` parameters."""
    batches = iter(trainer.get_train_dataloader())
    example = {key: value[:2] for key, value in next(batches).items() if key != "labels"}
    batch_size = trainer.args.per_device_train_batch_size
    scoring_batches = args.scoring_batches or math.ceil(0.1 * len(trainer.train_dataset) / batch_size)
    states = teacher.config.num_hidden_layers + 1
    if method.startswith("torch-pruning"):
        import torch_pruning as tp

        importance = method.removeprefix("torch-pruning-")
        torch.manual_seed(seed)
        gradient_batches = [next(batches) for _ in range(scoring_batches)] if importance == "taylor" else []
        gradients = task_gradients(teacher, gradient_batches) if gradient_batches else None
        student, ratio = bisect_ratio(
            lambda ratio: torch_pruning_prune(teacher, ratio, importance, example, gradients),
            lambda model: count_parameters(model),
            target,
        )
        channels = kept_channels(teacher.bert.embeddings.word_embeddings, student.bert.embeddings.word_embeddings)
        settings = {
            "torch_pruning_version": tp.__version__,
            "pruner": "BasePruner",
            "importance": "GroupMagnitudeImportance(p=2)" if importance == "magnitude" else "GroupTaylorImportance",
            "global_pruning": False,
            "iterative_steps": 1,
            "pruning_ratio": ratio,
            "head_pruning_ratio": ratio,
            "prune_num_heads": True,
            "prune_head_dims": False,
            "scoring_batches": len(gradient_batches),
            "hidden_size": student.config.hidden_size,
            "intermediate_size": student.config.intermediate_size,
            "num_attention_heads": student.config.num_attention_heads,
        }
        return student, settings, selection_bases(channels, teacher.config.hidden_size, states)
    heads, ffn = textpruner_sizes(teacher, kept_vocabulary, target)
    masks = textpruner_masks(teacher, trainer, heads, ffn, seed, scoring_batches, args.work_dir)
    student = apply_head_and_ffn_masks(teacher, masks["head_mask"], masks["ffn_mask"])
    student.config.intermediate_size = ffn
    identity = torch.eye(teacher.config.hidden_size)
    return student, {**TEXTPRUNER_SETTINGS, **masks["settings"], "heads": heads, "ffn_size": ffn}, [identity] * states


def textpruner_masks(teacher, trainer, heads: int, ffn: int, seed: int, scoring_batches: int, work_dir: str) -> dict:
    """TextPruner's head and FFN masks for ``teacher`` (run in ``outputs/peers-venv``; see the note above)."""
    from safetensors.torch import load_file, save_file

    if not textpruner_environment_ready():
        raise RuntimeError(f"{PEERS_VENV_PYTHON} with TextPruner is missing: create it as textpruner_masks.py says")
    scratch = os.path.join(work_dir, "peers", f"textpruner_inputs_s{seed}")
    os.makedirs(scratch, exist_ok=True)
    teacher.save_pretrained(os.path.join(scratch, "teacher"))
    torch.manual_seed(seed)
    batches = [batch for batch, _ in zip(trainer.get_train_dataloader(), range(scoring_batches), strict=False)]
    tensors = {f"{index}.{key}": value for index, batch in enumerate(batches) for key, value in batch.items()}
    save_file(tensors, os.path.join(scratch, "batches.safetensors"))
    output = os.path.join(scratch, f"masks_h{heads}_f{ffn}.safetensors")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "textpruner_masks.py")
    command = [PEERS_VENV_PYTHON, script, scratch, "--heads", str(heads), "--ffn", str(ffn), "--output", output]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"textpruner_masks.py failed: {result.stderr.strip().splitlines()[-1]}")
    masks = load_file(output)
    version = result.stdout.strip().splitlines()[-1]
    return {"head_mask": masks["head_mask"], "ffn_mask": masks["ffn_mask"], "settings": json.loads(version)}


def save_arm(model: nn.Module, tokenizer, directory: str) -> bool:
    """Save ``model`` and ``tokenizer`` into ``directory``; returns whether ``from_pretrained`` gives it back. When
    not (``BertConfig`` derives the head size from ``hidden_size / num_attention_heads``, which pruned heads of kept
    size break), ``peers_structure.json`` records the attention shapes for :func:`load_arm`."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if loads_back(model, directory):
        return True
    attention = [layer.attention.self for layer in model.bert.encoder.layer]
    structure = {
        "heads_per_layer": [module.num_attention_heads for module in attention],
        "head_size": attention[0].attention_head_size,
    }
    with open(os.path.join(directory, STRUCTURE_FILENAME), "w") as file:
        json.dump(structure, file)
    return False


def load_arm(directory: str) -> nn.Module:
    """The model :func:`save_arm` saved (or a ``frontier_point.py`` checkpoint), in eval mode."""
    from safetensors.torch import load_file

    from rmt_kd_hf.checkpoint import load_checkpoint

    structure_path = os.path.join(directory, STRUCTURE_FILENAME)
    if not os.path.exists(structure_path):
        return load_checkpoint(AutoModelForSequenceClassification, directory).eval()
    with open(structure_path) as file:
        structure = json.load(file)
    with open(os.path.join(directory, "config.json")) as file:
        model = bert_with_heads(json.load(file), structure["heads_per_layer"], structure["head_size"])
    model.load_state_dict(load_file(os.path.join(directory, "model.safetensors")))
    return model.eval()


def bert_with_heads(config: dict, heads_per_layer: Sequence[int], head_size: int) -> BertForSequenceClassification:
    """A randomly initialised ``BertForSequenceClassification`` of ``config`` whose layers have ``heads_per_layer``
    heads of ``head_size`` (which ``BertConfig`` cannot say when heads × head size differs from the hidden size)."""
    from transformers import BertConfig

    model = BertForSequenceClassification(BertConfig.from_dict({**config, "num_attention_heads": 1}))
    hidden = model.config.hidden_size
    for layer, heads in zip(model.bert.encoder.layer, heads_per_layer, strict=True):
        attention = layer.attention.self
        for name in ("query", "key", "value"):
            setattr(attention, name, nn.Linear(hidden, heads * head_size))
        layer.attention.output.dense = nn.Linear(heads * head_size, hidden)
        attention.num_attention_heads, attention.attention_head_size = heads, head_size
        attention.all_head_size, attention.scaling = heads * head_size, head_size**-0.5
    return model.eval()


def timing_model(row: dict, teacher: BertForSequenceClassification) -> tuple[nn.Module, str]:
    """The model to time for ``row``: its checkpoint when it is still in ``outputs/``, else a model of the shapes
    the row records, randomly initialised (the weights do not change the time); with what was used."""
    if os.path.exists(os.path.join(row["checkpoint"], "config.json")):
        return load_arm(row["checkpoint"]), "checkpoint"
    config = teacher.config.to_dict()
    layers, head_size = config["num_hidden_layers"], config["hidden_size"] // config["num_attention_heads"]
    settings = row["settings"]
    if row["method"] == "rmt-kd":
        from rmt_kd_hf.models.rmt_bert.configuration_rmt_bert import RMTBertConfig
        from rmt_kd_hf.models.rmt_bert.modeling_rmt_bert import RMTBertForSequenceClassification

        run = frontier_run(row)
        rmt_config = RMTBertConfig.from_dict({**config, **run["widths"], "vocab_size": run["vocabulary"]})
        return RMTBertForSequenceClassification(rmt_config).eval(), "recorded widths, random weights"
    vocabulary = frontier_run(row)["vocabulary"] if "vocabulary" not in row else row["vocabulary"]
    if row["method"].startswith("torch-pruning"):
        shapes = {"hidden_size": settings["hidden_size"], "intermediate_size": settings["intermediate_size"]}
        heads = settings["num_attention_heads"]
    else:  # textpruner: the hidden size stays
        shapes, heads = {"intermediate_size": settings["ffn_size"]}, settings["heads"]
    model = bert_with_heads({**config, **shapes, "vocab_size": vocabulary}, [heads] * layers, head_size)
    return model, "recorded shapes, random weights"


def frontier_run(row: dict) -> dict:
    """The ``frontier_points.jsonl`` run of the RMT-KD row of ``row``'s point, seed and teacher."""
    point = POINTS[row["point"]]
    for line in open(frontier_point.RESULTS):
        run = json.loads(line)
        if (
            run.get("teacher_fingerprint") == row["teacher_fingerprint"]
            and run["kind"] == "point"
            and run["seed"] == row["seed"]
            and run["steps"] == DISTILLATION["steps"]
            and run["target_parameter_ratio"] == point["target_ratio"]
            and (point["target_ratio"] is not None or run["quantile"] == point["quantile"])
        ):
            return run
    raise LookupError(f"no frontier_points.jsonl run for {row['point']} seed {row['seed']}")


def loads_back(model: nn.Module, directory: str) -> bool:
    """Whether ``AutoModelForSequenceClassification.from_pretrained(directory)`` gives ``model`` back."""
    from transformers import AutoModelForSequenceClassification

    try:
        loaded = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    except (RuntimeError, ValueError, OSError):
        return False
    inputs = {"input_ids": torch.randint(5, 100, (2, 12))}
    with torch.no_grad():
        return bool(torch.allclose(loaded(**inputs).logits, model(**inputs).logits, atol=1e-5))


def latency_rows(results: dict, args: argparse.Namespace) -> None:
    """Speed-ups at batch 1 and 32 (seq 128) of one model per arm against the teacher, measured in this process in
    alternating rounds; written into every row of that arm. The model is the newest seed's checkpoint still in
    ``outputs/``, or one of the recorded shapes (:func:`timing_model`)."""
    from rmt_kd_hf.reports import cpu_latency

    _, teacher = frontier_point.converged_teacher(args.work_dir)
    teacher.eval()
    newest = {}
    for row in results["points"]:
        if row["status"] == "ok":
            newest[(row["method"], row["point"])] = row  # rows are appended in order: the last is the newest
    models, timed = {}, {}
    for key, row in newest.items():
        models[key], source = timing_model(row, teacher)
        timed[key] = {"seed": row["seed"], "model": source, "parameters": count_parameters(models[key])}
    timings = {key: {1: [], 32: []} for key in [("teacher", ""), *models]}
    for _ in range(args.latency_rounds):
        for batch_size, repeats in ((1, 10), (32, 3)):
            for key, model in [(("teacher", ""), teacher), *models.items()]:
                timings[key][batch_size].append(cpu_latency(model, batch_size, 128, repeats=repeats, warmup=2))
    median = {
        key: {size: statistics.median(values) for size, values in sizes.items()} for key, sizes in timings.items()
    }
    for row in results["points"]:
        key = (row["method"], row["point"])
        if key in median:
            row["speedup_b1"] = median[("teacher", "")][1] / median[key][1]
            row["speedup_b32"] = median[("teacher", "")][32] / median[key][32]
            row["latency_threads"] = torch.get_num_threads()
            row["latency_rounds"] = args.latency_rounds
            row["timed"] = timed[key]


def main(argv=None) -> dict:
    args = parse_arguments(argv)
    results = load_results()
    if not args.tables_only:
        command = shlex.join(["python", "benchmarks/peers.py", *(argv if argv is not None else sys.argv[1:])])
        _, teacher = frontier_point.converged_teacher(args.work_dir)
        fingerprint = frontier_point.model_fingerprint(teacher)
        del teacher
        for point in args.points:
            for seed in args.seeds:
                # a (point, seed) block is compared within one teacher: its arms are run from the same one
                block = [row for row in results["points"] if row["point"] == point and row["seed"] == seed]
                teachers = {row["teacher_fingerprint"] for row in block if "teacher_fingerprint" in row}
                missing = [method for method in args.methods if method not in {row["method"] for row in block}]
                if missing and teachers - {fingerprint}:
                    print(f"{point} seed {seed}: its runs so far come from another teacher; skipping {missing}")
                    continue
                reference = next((row for row in block if row["method"] == "rmt-kd"), None)
                for method in missing:
                    if method == "rmt-kd":
                        row = reference = rmt_kd_row(rmt_kd_point(point, seed, args.work_dir), point)
                    else:
                        if reference is None:
                            reference = rmt_kd_row(rmt_kd_point(point, seed, args.work_dir), point)
                        # every peer is cut to the size of RMT-KD's run at the same point, seed and teacher
                        row = peer_point(method, point, seed, reference["parameters"], args)
                    results["points"].append({**row, "command": command})
                    save_results(results)
        if args.latency_rounds:
            latency_rows(results, args)
            save_results(results)
    write_tables(results)
    return results


def mean_and_error(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (0 for a single value)."""
    mean = statistics.fmean(values)
    error = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, error


def write_tables(results: dict) -> None:
    """``peers.md`` (per point and method: accuracies with standard errors, the difference from RMT-KD, size,
    speed, loading) and ``peers.png`` (test accuracy against parameters removed, one series per method)."""
    lines = [
        "# RMT-KD against Torch-Pruning and TextPruner (issue #18)",
        "",
        "Every arm: the converged MiniLM-L6 teacher, the same trimmed vocabulary, cut to the parameter count of an "
        "RMT-KD frontier point (±1%), then the same 600-step distillation (α = 0.7, T = 1, lr 1e-4, batch 32, "
        "hidden-state term β = 1 in each arm's kept basis). Accuracy: mean ± standard error over seeds (no ± with "
        "one seed); Δ: the mean over seeds of the difference from RMT-KD's run of the same point and seed, ± its "
        "standard error (the runs of one seed start from the same teacher, `teacher_fingerprint` in `peers.json`; a "
        "fresh `outputs/` trains another teacher, since CPU training is not bit-reproducible here). Speed-ups: one "
        "model per arm "
        "(`timed` in `peers.json`: a checkpoint, or the recorded shapes with random weights when the checkpoint is "
        "gone), batch 1 and 32 × 128 tokens, median of alternating rounds against the teacher in one process. "
        "Command: `python benchmarks/peers.py --work_dir outputs/bench`.",
        "",
    ]
    rows = results["points"]
    for point in POINTS:
        at_point = [row for row in rows if row["point"] == point]
        if not at_point:
            continue
        lines += [
            f"## Point {point}",
            "",
            "| method | seeds | params removed | test accuracy | Δ test | validation accuracy | Δ validation "
            "| speed-up b1 | speed-up b32 | loads with from_pretrained | status |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        reference = [row for row in at_point if row["method"] == "rmt-kd" and row["status"] == "ok"]
        for method in METHODS:
            runs = [row for row in at_point if row["method"] == method]
            if not runs:
                continue
            ok = [row for row in runs if row["status"] == "ok"]
            if not ok:
                lines.append(f"| {method} | {len(runs)} | | | | | | | | | {runs[0]['status']} |")
                continue
            cells = []
            for split in ("test_accuracy", "validation_accuracy"):
                mean, error = mean_and_error([row[split] for row in ok])
                cells.append(f"{100 * mean:.2f}" + (f" ± {100 * error:.2f}" if len(ok) > 1 else ""))
                base = {row["seed"]: row for row in reference}
                paired = [row[split] - base[row["seed"]][split] for row in ok if row["seed"] in base]
                if method != "rmt-kd" and paired:
                    # paired by seed: both arms of a seed come from the same teacher and the same vocabulary
                    difference, difference_error = mean_and_error(paired)
                    error_text = f" ± {100 * difference_error:.2f}" if len(paired) > 1 else ""
                    cells.append(f"{100 * difference:+.2f}{error_text}")
                else:
                    cells.append("")
            speed = [f"{ok[0][key]:.2f}×" if key in ok[0] else "" for key in ("speedup_b1", "speedup_b32")]
            reduction = statistics.fmean(row["param_reduction"] for row in ok)
            lines.append(
                f"| {method} | {len(ok)} | {100 * reduction:.1f}% | {' | '.join(cells)} | {' | '.join(speed)} "
                f"| {ok[0]['loads_with_from_pretrained']} | ok |"
            )
        teachers = {}
        for row in at_point:
            if row["status"] == "ok":
                teachers.setdefault(row["teacher_fingerprint"], (row, set()))[1].add(row["seed"])
        lines.append("")
        for fingerprint, (row, seeds) in teachers.items():
            lines.append(
                f"Teacher `{fingerprint[:12]}` (validation {100 * row['teacher_validation_accuracy']:.2f}%, test "
                f"{100 * row['teacher_test_accuracy']:.2f}%): seeds {', '.join(map(str, sorted(seeds)))}."
            )
        lines.append("")
    with open(os.path.join(RESULTS_DIR, "peers.md"), "w") as file:
        file.write("\n".join(lines))
    _plot(rows)


def _plot(rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        return
    figure, axes = pyplot.subplots(figsize=(6.5, 4.5))
    for method in METHODS:
        ok = [row for row in rows if row["method"] == method and row["status"] == "ok"]
        if not ok:
            continue
        by_point = {}
        for row in ok:
            by_point.setdefault(row["point"], []).append(row)
        points = sorted(by_point.values(), key=lambda runs: runs[0]["param_reduction"])
        x = [100 * statistics.fmean(row["param_reduction"] for row in runs) for runs in points]
        y = [mean_and_error([100 * row["test_accuracy"] for row in runs]) for runs in points]
        axes.errorbar(x, [mean for mean, _ in y], yerr=[error for _, error in y], marker="o", capsize=3, label=method)
    teacher = next((row for row in rows if "teacher_test_accuracy" in row), None)
    if teacher:
        axes.axhline(100 * teacher["teacher_test_accuracy"], color="grey", linestyle="--", label="teacher")
    axes.set_xlabel("parameters removed (%)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("Equal size, equal distillation: MiniLM-L6, movie reviews")
    axes.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(RESULTS_DIR, "peers.png"), dpi=120)
    pyplot.close(figure)


def rmt_kd_row(run: dict, point: str) -> dict:
    """A ``frontier_points.jsonl`` run as a row of this table."""
    return {
        "method": "rmt-kd",
        "point": point,
        "seed": run["seed"],
        "status": "ok",
        "settings": {"quantile": run["quantile"], "target_parameter_ratio": run["target_parameter_ratio"]},
        "parameters": run["parameters"],
        "param_reduction": run["param_reduction"],
        "validation_accuracy": run["validation_accuracy"],
        "validation_holdout_accuracy": run["validation_holdout_accuracy"],
        "test_accuracy": run["test_accuracy"],
        "loads_with_from_pretrained": True,
        "checkpoint": run["checkpoint"],
        "teacher_fingerprint": run["teacher_fingerprint"],
        "teacher_validation_accuracy": run["teacher_validation_accuracy"],
        "teacher_test_accuracy": run["teacher_test_accuracy"],
        "frontier_command": run["command"],
    }


if __name__ == "__main__":
    main()
