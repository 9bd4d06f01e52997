"""Shared fixtures: a tiny random BERT and calibration batches with padding."""

import os
import tempfile

import pytest
import torch
import transformers
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, default_data_collator

import rmt_kd_hf  # noqa: F401  (registers the Auto classes)
from rmt_kd_hf import RMTKDConfig, RMTKDTrainer

TINY_SIZES = dict(
    vocab_size=120,
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
    max_position_embeddings=40,
)


def tiny_bert_config(**overrides) -> BertConfig:
    return BertConfig(**{**TINY_SIZES, "num_labels": 3, **overrides})


def make_batches(num_batches: int = 6, batch_size: int = 8, seq_length: int = 16, vocab_size: int = 120, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        input_ids = torch.randint(1, vocab_size, (batch_size, seq_length), generator=generator)
        attention_mask = torch.ones(batch_size, seq_length, dtype=torch.long)
        lengths = torch.randint(seq_length // 2, seq_length + 1, (batch_size,), generator=generator)
        for row, length in enumerate(lengths.tolist()):
            attention_mask[row, length:] = 0
            input_ids[row, length:] = 0
        batches.append(
            {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "labels": torch.randint(0, 3, (batch_size,), generator=generator),
            }
        )
    return batches


@pytest.fixture
def batches():
    return make_batches()


@pytest.fixture
def config():
    return tiny_bert_config()


def logits_of(model, batch):
    model.eval()
    with torch.no_grad():
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if hasattr(output, "logits"):
        return output.logits
    if hasattr(output, "start_logits"):
        return torch.stack([output.start_logits, output.end_logits])
    return output.pooler_output  # base models: the pooler reads the rotated stream back


def token_task(num_rows: int, seed: int) -> Dataset:
    """Label 1 when token 7 appears in the sequence: learnable by a tiny BERT in a few dozen steps."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(8, 120, (num_rows, 12), generator=generator)
    labels = torch.randint(0, 2, (num_rows,), generator=generator)
    positions = torch.randint(1, 12, (num_rows,), generator=generator)
    input_ids[labels == 1, positions[labels == 1]] = 7
    input_ids[:, 0] = 1
    return Dataset.from_dict(
        {
            "input_ids": input_ids.tolist(),
            "attention_mask": torch.ones_like(input_ids).tolist(),
            "labels": labels.tolist(),
        }
    )


def accuracy(eval_prediction):
    return {"accuracy": float((eval_prediction.predictions.argmax(-1) == eval_prediction.label_ids).mean())}


# RMTKDConfig fields every test trainer shares: CPU, no reports, saves, logs or progress bars
QUIET_CPU_ARGS = dict(report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True)


def make_trainer(
    tmp_path, compute_metrics=accuracy, model=None, train_rows=320, eval_rows=128, callbacks=None, **overrides
):
    """An ``RMTKDTrainer`` on :func:`token_task` with a seeded tiny BERT; ``overrides`` go to ``RMTKDConfig``."""
    torch.manual_seed(0)
    fields = dict(
        output_dir=str(tmp_path / "out") if tmp_path is not None else None,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=3e-3,
        stage_max_steps=10,
        max_steps=60,
        seed=0,
        **QUIET_CPU_ARGS,
    )
    fields.update(overrides)
    model = BertForSequenceClassification(tiny_bert_config(num_labels=2)) if model is None else model
    return RMTKDTrainer(
        model=model,
        args=RMTKDConfig(**fields),
        train_dataset=token_task(train_rows, 0),
        eval_dataset=token_task(eval_rows, 1),
        data_collator=default_data_collator,
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )


TINY_VOCAB = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4} | {
    f"w{index}": index for index in range(5, 120)
}


def save_tiny_teacher(folder, num_labels: int = 2, tokenizer: bool = True, **config_overrides):
    """A seeded tiny random BERT classifier saved in ``folder``, with a word-level tokenizer (w5, w6, ...)."""
    from transformers import BertTokenizerFast

    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config(num_labels=num_labels, **config_overrides)).save_pretrained(folder)
    if tokenizer:
        BertTokenizerFast(vocab=TINY_VOCAB).save_pretrained(folder)
    return folder


def logits_without_the_package(directory, batch: dict, tmp_path, class_name: str) -> torch.Tensor:
    """Sequence-classification logits of the saved ``directory`` on ``batch``, loaded in a subprocess where
    ``rmt_kd_hf`` cannot be imported (``trust_remote_code=True``, the folder's own files); checks the class name."""
    import subprocess
    import sys

    torch.save({key: batch[key] for key in ("input_ids", "attention_mask")}, tmp_path / "inputs.pt")
    script = f"""
import sys
sys.modules["rmt_kd_hf"] = None  # any import of the package now fails
import torch
from transformers import AutoModelForSequenceClassification
model = AutoModelForSequenceClassification.from_pretrained({str(directory)!r}, trust_remote_code=True).eval()
assert model.__class__.__module__.startswith("transformers_modules"), model.__class__.__module__
assert model.__class__.__name__ == {class_name!r}, model.__class__.__name__
with torch.no_grad():
    torch.save(model(**torch.load({str(tmp_path / "inputs.pt")!r})).logits, {str(tmp_path / "logits.pt")!r})
"""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "logits.pt")


def save_cli_teacher(model, folder):
    """``model`` saved in ``folder`` with the tiny word-level tokenizer (any family: its ids are those of the tiny
    vocabulary), as ``rmt-kd compress --model_name_or_path`` reads it."""
    from transformers import BertTokenizerFast

    model.save_pretrained(folder)
    BertTokenizerFast(vocab=TINY_VOCAB).save_pretrained(folder)
    return folder


def tiny_csv_files(folder) -> dict:
    """``{"train": path, "validation": path}``: 32 rows of two easy classes in the tiny vocabulary."""
    import pandas as pd

    rows = pd.DataFrame({"sentence": ["w7 w9 w11", "w8 w10", "w7 w12 w13", "w14 w15"] * 8, "label": [1, 0, 1, 0] * 8})
    paths = {split: folder / f"{split}.csv" for split in ("train", "validation")}
    for path in paths.values():
        rows.to_csv(path, index=False)
    return paths


def cli_compress(teacher, paths: dict, output_dir, *options: str) -> int:
    """``rmt-kd compress`` on ``{split: data file}`` with one quick stage; returns the exit status."""
    from rmt_kd_hf.cli import main

    files = [f"--{split}_file={path}" for split, path in paths.items()]
    quick = ["--stage_max_steps=1", "--max_stages=1", "--max_metric_drop=1.0", "--measure_latency=false"]
    cache = os.path.join(tempfile.gettempdir(), "rmt_kd_tests_datasets_cache")  # not under output_dir's parent
    quiet = ["--report_to=none", "--disable_tqdm=true", "--use_cpu=true", f"--cache_dir={cache}"]
    argv = ["compress", f"--model_name_or_path={teacher}", *files, f"--output_dir={output_dir}", "--do_train"]
    return main([*argv, *quick, *quiet, *options])


# The encoder families beside BERT, as tiny random models built from transformers' own config classes.
COMMON = {**TINY_SIZES, "pad_token_id": 0}  # the test batches pad with 0: RoBERTa's positions then skip the padding
FAMILIES = {  # family: (config class, extra config fields, its model_type when compressed)
    "roberta": (transformers.RobertaConfig, {"type_vocab_size": 1}, "rmt_roberta"),
    "xlm_roberta": (transformers.XLMRobertaConfig, {"type_vocab_size": 1}, "rmt_xlm_roberta"),
    "electra": (transformers.ElectraConfig, {"embedding_size": 32}, "rmt_electra"),  # with embeddings_project
    "distilbert": (transformers.DistilBertConfig, {}, "rmt_distilbert"),  # BERT's fields under other names
}
HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "Model")
TEACHER_PREFIX = {"roberta": "Roberta", "xlm_roberta": "XLMRoberta", "electra": "Electra", "distilbert": "DistilBert"}


def family_teacher(family: str, head: str = "ForSequenceClassification", seed: int = 0, **overrides):
    """A seeded tiny random ``<Family><head>`` teacher, its weights moved off their initial values."""
    config_class, extra, _ = FAMILIES[family]
    num_labels = 2 if head == "ForQuestionAnswering" else 3
    fields = {**COMMON, **extra, "num_labels": num_labels, **overrides}
    if config_class is transformers.DistilBertConfig:
        names = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads"}
        fields = {names.get(key, key): value for key, value in fields.items()}
        fields["hidden_dim"] = fields.pop("intermediate_size")
    config = config_class(**fields)
    torch.manual_seed(seed)
    teacher = getattr(transformers, f"{TEACHER_PREFIX[family]}{head}")(config).eval()
    with torch.no_grad():  # LayerNorm gains and biases are 1 and 0 at initialisation: make them generic
        for parameter in teacher.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return teacher
