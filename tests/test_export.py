"""ONNX export of compressed and plain models, int8, the served folder without torch, bad inputs."""

import builtins
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import (
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    BertTokenizerFast,
    GPT2Config,
    GPT2ForSequenceClassification,
)

from rmt_kd_hf import compress_model
from rmt_kd_hf.checkpoint import save_compressed
from rmt_kd_hf.cli import main as cli_main

from .conftest import FAMILIES, family_teacher, logits_of, make_batches, tiny_bert_config
from .resnet_fixtures import image_batches, tiny_resnet

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install 'rmt-kd-hf[onnx]'")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed: pip install 'rmt-kd-hf[onnx]'")

from rmt_kd_hf.export import (  # noqa: E402
    ONNX_FILENAME,
    QUANTIZED_FILENAME,
    ExportError,
    Int8Settings,
    export_onnx,
    ort_feed,
    ort_session,
)


def tiny_tokenizer() -> BertTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    vocab.update({f"w{index}": index for index in range(5, 120)})
    return BertTokenizerFast(vocab=vocab)


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory):
    """A tiny teacher and its compressed student, saved with a tokenizer."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    batches = make_batches()
    teacher = BertForSequenceClassification(tiny_bert_config()).eval()
    student, _ = compress_model(teacher, batches, sigma_quantile=0.6, progress=False)
    tokenizer = tiny_tokenizer()
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    save_compressed(student, root / "student", tokenizer)
    return root, teacher, student.eval(), batches


def onnx_logits(path, batch) -> np.ndarray:
    session = ort_session(path)
    return session.run(["logits"], ort_feed(session, batch))[0]


def padded_batch(batch_size: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Rows of different lengths (padding) with ids of the tiny vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 120, (batch_size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row in range(batch_size):
        attention_mask[row, length - row :] = 0
    return {"input_ids": input_ids.masked_fill(attention_mask == 0, 0), "attention_mask": attention_mask}


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_fp32_graph_matches_pytorch_with_dynamic_batch_length_and_padding(saved_pair, tmp_path, which):
    root, teacher, student, _ = saved_pair
    model = student if which == "student" else teacher
    exported = export_onnx(root / which, tmp_path / "onnx")
    assert exported.max_abs_difference <= 1e-4
    for batch_size, length in ((1, 5), (3, 12), (6, 40)):  # 40 = max_position_embeddings
        batch = padded_batch(batch_size, length, seed=length)
        np.testing.assert_allclose(onnx_logits(exported.onnx_path, batch), logits_of(model, batch).numpy(), atol=1e-4)


def test_int8_file_is_smaller_and_agrees_with_fp32(saved_pair, tmp_path):
    root, _, student, _ = saved_pair
    exported = export_onnx(root / "student", tmp_path / "onnx", quantize="int8")
    assert os.path.getsize(exported.quantized_path) < os.path.getsize(exported.onnx_path)
    batch = padded_batch(8, 16, seed=3)
    fp32, int8 = onnx_logits(exported.onnx_path, batch), onnx_logits(exported.quantized_path, batch)
    assert np.abs(int8 - fp32).max() < 0.2 * np.abs(fp32).max()
    assert exported.int8["fp32_weight_products"] > 0  # the lifted LayerNorms' products


def test_keep_float_leaves_the_named_modules_in_fp32(saved_pair, tmp_path):
    import onnx

    root = saved_pair[0]
    plain = export_onnx(root / "student", tmp_path / "plain", quantize="int8", int8=Int8Settings(keep_float=()))
    kept = export_onnx(root / "student", tmp_path / "kept", quantize="int8")  # default: LayerNorm products fp32
    assert kept.int8["fp32_weight_products"] > plain.int8["fp32_weight_products"]

    def integer_products(path):
        return sum(node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for node in onnx.load(path).graph.node)

    assert integer_products(kept.quantized_path) < integer_products(plain.quantized_path)


@pytest.mark.parametrize(
    "model_class", [BertModel, BertForTokenClassification, BertForQuestionAnswering], ids=lambda c: c.__name__
)
def test_every_compressed_head_exports(model_class, tmp_path):
    torch.manual_seed(0)
    config = tiny_bert_config(num_labels=2)  # question answering: start and end
    student, _ = compress_model(model_class(config).eval(), make_batches(), progress=False)
    save_compressed(student, tmp_path / "student")
    exported = export_onnx(tmp_path / "student", tmp_path / "onnx")
    assert exported.max_abs_difference <= 1e-4
    expected_outputs = {
        BertModel: ["last_hidden_state", "pooler_output"],
        BertForTokenClassification: ["logits"],
        BertForQuestionAnswering: ["start_logits", "end_logits"],
    }
    assert exported.output_names == expected_outputs[model_class]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_encoder_family_exports_with_dynamic_batch_length_and_padding(family, tmp_path):
    student, _ = compress_model(family_teacher(family), make_batches(), sigma_quantile=0.6, progress=False)
    save_compressed(student, tmp_path / "student")
    exported = export_onnx(tmp_path / "student", tmp_path / "onnx", quantize="int8")
    assert exported.max_abs_difference <= 1e-4
    longest = 40 - 1 if family != "electra" else 40  # RoBERTa's positions start after pad_token_id = 0
    for batch_size, length in ((1, 5), (3, longest)):
        batch = padded_batch(batch_size, length, seed=length)
        np.testing.assert_allclose(onnx_logits(exported.onnx_path, batch), logits_of(student, batch).numpy(), atol=1e-4)


def test_compressed_resnet_exports_with_dynamic_image_size(tmp_path):
    teacher = tiny_resnet().eval()
    student, _ = compress_model(teacher, image_batches(), sigma_quantile=0.5, progress=False)
    save_compressed(student.eval(), tmp_path / "student")
    exported = export_onnx(tmp_path / "student", tmp_path / "onnx", quantize="int8")
    session = ort_session(exported.onnx_path)
    for side in (32, 57):
        pixels = torch.randn(2, 1, side, side, generator=torch.Generator().manual_seed(side))
        with torch.no_grad():
            expected = student(pixel_values=pixels).logits.numpy()
        np.testing.assert_allclose(session.run(["logits"], {"pixel_values": pixels.numpy()})[0], expected, atol=1e-4)


def test_exported_folder_serves_without_torch_or_the_package(saved_pair, tmp_path):
    root, _, student, _ = saved_pair
    exported = export_onnx(root / "student", tmp_path / "onnx", quantize="int8")
    assert {"config.json", "tokenizer.json", ONNX_FILENAME, QUANTIZED_FILENAME} <= set(os.listdir(exported.output_dir))
    texts = ["w5 w9 w17 w33", "w100 w7"]
    tokenizer = tiny_tokenizer()
    expected = logits_of(student, tokenizer(texts, padding=True, return_tensors="pt"))
    script = f"""
import sys
sys.modules["torch"] = None  # any import of torch, or of rmt_kd_hf, now fails
sys.modules["rmt_kd_hf"] = None
import json, numpy as np, onnxruntime
from tokenizers import Tokenizer
folder = {exported.output_dir!r}
tokenizer = Tokenizer.from_file(folder + "/tokenizer.json")
tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
encodings = tokenizer.encode_batch({texts!r})
feed = {{
    "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
    "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
    "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
}}
labels = json.load(open(folder + "/config.json"))["id2label"]
for name in ("model.onnx", "model_quantized.onnx"):
    session = onnxruntime.InferenceSession(folder + "/" + name, providers=["CPUExecutionProvider"])
    print(json.dumps(session.run(["logits"], feed)[0].tolist()))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    fp32, int8 = (np.array(json.loads(line)) for line in result.stdout.strip().splitlines())
    np.testing.assert_allclose(fp32, expected.numpy(), atol=1e-4)
    assert (int8.argmax(-1) == fp32.argmax(-1)).mean() >= 0.5


def test_auto_tokenizer_loads_the_exported_folder_without_the_package_or_a_prompt(saved_pair, tmp_path):
    exported = export_onnx(saved_pair[0] / "student", tmp_path / "onnx")
    script = f"""
import sys
sys.modules["rmt_kd_hf"] = None
from transformers import AutoTokenizer
print(AutoTokenizer.from_pretrained({exported.output_dir!r})("w5 w9")["input_ids"])
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "custom code" not in result.stdout + result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == tiny_tokenizer()("w5 w9")["input_ids"]


def test_cli_export_writes_the_folder(saved_pair, tmp_path, capsys):
    output = tmp_path / "cli"
    status = cli_main(["export", str(saved_pair[0] / "student"), "--output", str(output), "--quantize", "int8"])
    assert status == 0, capsys.readouterr().err
    assert {ONNX_FILENAME, QUANTIZED_FILENAME, "config.json"} <= set(os.listdir(output))
    assert "max |ONNX - PyTorch|" in capsys.readouterr().out


def test_bench_gains_onnx_runtime_rows(saved_pair, tmp_path):
    root = saved_pair[0]
    output = tmp_path / "bench.json"
    argv = ["bench", str(root / "teacher"), str(root / "student"), "--onnx", "--batch_sizes", "1", "2"]
    assert cli_main([*argv, "--sequence_length", "8", "--repeats", "2", "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    for name in ("teacher", "compressed"):
        assert set(result[name]["runtimes"]) == {"ort-fp32", "ort-int8"}
        for row in result[name]["runtimes"].values():
            assert set(row["latency_seconds"]) == {"1", "2"} and row["onnx_mb"] > 0


def bad_export_cases(root, tmp_path):
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("hello")
    gpt2 = tmp_path / "gpt2"
    GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    student = root / "student"
    return [
        (dict(model_dir=tmp_path / "missing", output_dir=tmp_path / "o1"), "is not a directory"),
        (dict(model_dir=not_a_model, output_dir=tmp_path / "o2"), "has no config.json"),
        (
            dict(model_dir=gpt2, output_dir=tmp_path / "o3"),
            "supports model types bert, rmt_bert, rmt_roberta, .*, resnet, rmt_resnet; this model is .gpt2.",
        ),
        (dict(model_dir=student, output_dir=occupied), "exists and is not empty"),
        (dict(model_dir=student, output_dir=student, overwrite=True), "the model's own folder"),
        (dict(model_dir=student, output_dir=tmp_path / "o4", quantize="int4"), "quantize must be None or 'int8'"),
        (dict(model_dir=student, output_dir=tmp_path / "o5", opset=9), "opset must be between"),
    ]


def test_bad_exports_fail_clearly_and_write_nothing(saved_pair, tmp_path):
    root = saved_pair[0]
    for kwargs, message in bad_export_cases(root, tmp_path):
        before = sorted(os.listdir(tmp_path))
        with pytest.raises(ExportError, match=message):
            export_onnx(**kwargs)
        assert sorted(os.listdir(tmp_path)) == before, kwargs
    assert os.listdir(tmp_path / "occupied") == ["keep.txt"]


def test_cli_export_errors_are_one_line(saved_pair, tmp_path, capsys):
    status = cli_main(["export", str(tmp_path / "missing"), "--output", str(tmp_path / "out")])
    assert status == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is not a directory" in error


def test_a_missing_extra_names_the_install_command(saved_pair, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def without_onnxscript(name, *args, **kwargs):
        if name == "onnxscript":
            raise ImportError("No module named 'onnxscript'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_onnxscript)
    with pytest.raises(ImportError, match=r"'onnxscript'.*pip install 'rmt-kd-hf\[onnx\]'"):
        export_onnx(saved_pair[0] / "student", tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
