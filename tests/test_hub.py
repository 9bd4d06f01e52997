"""push_to_hub → from_pretrained(hub id, trust_remote_code=True) through a loopback Hub (tests/hub_server.py).

The pushes and the loads run in fresh processes: HF_ENDPOINT must be set before huggingface_hub is imported, and
the loader must not see rmt_kd_hf (only the modeling file that travelled with the weights).
"""

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

import pytest
import torch
from huggingface_hub import ModelCard

from .hub_server import LoopbackHub, loopback_hub

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINER_REPO, BARE_REPO = "user/rmt-kd-trainer", "user/rmt-kd-bare"

PUSH = textwrap.dedent(
    f"""
    import json, pathlib, sys
    import torch
    from transformers import BertTokenizerFast
    from tests.conftest import make_trainer

    output = pathlib.Path(sys.argv[1])
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{{i}}" for i in range(115)]
    tokenizer = BertTokenizerFast(vocab={{word: index for index, word in enumerate(words)}})
    trainer = make_trainer(
        output, sigma_quantile=0.6, max_metric_drop=1.0, stage_max_steps=2, max_steps=2, hub_model_id="{TRAINER_REPO}"
    )
    trainer.processing_class = tokenizer
    model = trainer.compress().eval()
    tokenizer = trainer.processing_class  # trimmed to the training vocabulary with the model
    assert len(tokenizer) == model.config.vocab_size < len(words)
    trainer.push_to_hub(finetuned_from="user/tiny-teacher")
    model.push_to_hub("{BARE_REPO}")
    tokenizer.push_to_hub("{BARE_REPO}")
    inputs = tokenizer(["w1 w7 w20 w3", "w9 w9"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    (output / "expected.json").write_text(json.dumps({{"logits": logits.tolist(), "type": type(model).__name__}}))
    """
)

LOAD = textwrap.dedent(
    f"""
    import json, sys
    sys.modules["rmt_kd_hf"] = None  # the package is not importable: only trust_remote_code can load the model
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    results = {{}}
    for repo in ("{TRAINER_REPO}", "{BARE_REPO}"):
        tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)  # without it: an input() prompt
        model = AutoModelForSequenceClassification.from_pretrained(repo, trust_remote_code=True).eval()
        inputs = tokenizer(["w1 w7 w20 w3", "w9 w9"], padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits
        results[repo] = {{"logits": logits.tolist(), "type": type(model).__name__, "module": type(model).__module__}}
    print("RESULT " + json.dumps(results))
    """
)


def hub_env(endpoint: str, home: str) -> dict[str, str]:
    """A process environment that talks to the loopback hub only, with an empty cache of its own."""
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=home,
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        PYTHONPATH=REPO_ROOT,
    )
    env.pop("HF_TOKEN", None)
    return env


def run_python(script: str, env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """Push a compressed run (Trainer.push_to_hub) and a bare model (model.push_to_hub), load both back."""
    tmp = tmp_path_factory.mktemp("hub")
    with loopback_hub(max_lifetime_s=600) as hub:
        run_python(PUSH, hub_env(hub.endpoint, str(tmp / "home-push")), str(tmp / "run"))
        stdout = run_python(LOAD, hub_env(hub.endpoint, str(tmp / "home-load")))
        files = {repo: dict(hub.store.snapshot(repo, "main")[1]) for repo in (TRAINER_REPO, BARE_REPO)}
    assert hub.server.socket.fileno() == -1  # the server stopped with the with-block
    loaded = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[len("RESULT ") :])
    expected = json.loads((tmp / "run" / "expected.json").read_text())
    return files, loaded, expected, tmp / "run"


def test_both_pushes_load_back_from_the_hub_id_without_the_package(pushed):
    _, loaded, expected, _ = pushed
    for repo in (TRAINER_REPO, BARE_REPO):
        assert loaded[repo]["type"] == expected["type"] == "RMTBertForSequenceClassification"
        assert loaded[repo]["module"].startswith("transformers_modules.")  # the remote code, not rmt_kd_hf
        torch.testing.assert_close(torch.tensor(loaded[repo]["logits"]), torch.tensor(expected["logits"]))


def test_model_push_uploads_what_loading_needs(pushed):
    files = pushed[0][BARE_REPO]
    needed = {"config.json", "model.safetensors", "modeling_rmt_bert.py", "configuration_rmt_bert.py"}
    assert needed | {"tokenizer.json", "tokenizer_config.json"} <= set(files)
    config = json.loads(files["config.json"])
    assert config["model_type"] == "rmt_bert"
    assert config["auto_map"]["AutoModelForSequenceClassification"].endswith("RMTBertForSequenceClassification")
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)  # no pickled weights


def test_trainer_push_uploads_the_card_history_spectra_and_plots(pushed):
    files, _, _, run_dir = pushed
    uploaded = files[TRAINER_REPO]
    for name in ("config.json", "model.safetensors", "modeling_rmt_bert.py", "tokenizer.json"):
        assert name in uploaded
    for name in ("rmt_kd_history.json", "rmt_kd_spectra.json", "README.md", "spectra/overview.png"):
        assert uploaded[name] == (run_dir / "out" / name).read_bytes(), name  # make_trainer's output_dir
    history = json.loads(uploaded["rmt_kd_history.json"])
    card = ModelCard(uploaded["README.md"].decode())
    assert card.data.base_model == "user/tiny-teacher" and "rmt-kd" in card.data.tags
    assert card.data.eval_results[0].metric_value == history["stages"][0]["eval_accuracy"]
    assert f'from_pretrained("{TRAINER_REPO}", trust_remote_code=True)' in card.text
    site_plots = [name for name in uploaded if name.startswith("spectra/stage0_")]
    assert len(site_plots) == len(history["stages"][0]["sites"])


def test_the_loopback_hub_answers_hub_error_codes_and_stops_by_itself():
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    hub = LoopbackHub(max_lifetime_s=0.5).start()
    try:
        with pytest.raises(urllib.error.HTTPError) as error:
            opener.open(f"{hub.endpoint}/api/models/user/none", timeout=5)
        assert error.value.code == 404 and error.value.headers["X-Error-Code"] == "RepoNotFound"
        deadline = time.monotonic() + 10
        while hub.server.socket.fileno() != -1 and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(urllib.error.URLError):
            opener.open(f"{hub.endpoint}/api/models/user/none", timeout=5)
    finally:
        hub.stop()
