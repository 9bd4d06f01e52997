"""RMT-KD surgery for post-LayerNorm BERT encoders (``BertModel`` and its task heads).

A teacher is first re-expressed exactly as an ``RMTBert*`` model with identity bases (``prepare``). Every
compression is then a rotation + truncation of the current coordinates, so a once-compressed model can be
compressed again with the same code (design notes §3):

* residual boundary ``b`` (``2L + 1`` of them): new basis ``Q_b`` (k' x k) from the covariance of the
  LayerNorm output plus the next LayerNorm's input (the residual sum), each normalised by its trace;
* Q/K/V read ``W Q_inᵀ``; attention-output and FFN-output denses write ``Q W``; LayerNorms are lifted:
  ``W' = Q_out W Q_inᵀ, c' = Q_in c, g' = Q_out g, b' = Q_out b``;
* FFN: keep a subset of neurons (pivoted QR on the top eigenvectors) and fold the least-squares
  reconstruction of the dropped ones into the output dense;
* embeddings: one basis for the pre-LayerNorm sum, from calibration tokens plus the vocabulary rows.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)

from ..calibration import ActivationTap
from ..models.rmt_bert import (
    RMTBertConfig,
    RMTBertForQuestionAnswering,
    RMTBertForSequenceClassification,
    RMTBertForTokenClassification,
    RMTBertModel,
    RMTBertPreTrainedModel,
)
from ..spectral import CovarianceAccumulator
from .base import Site, SiteAnalysis, least_squares_compensation, select_neurons

TEACHER_TO_RMT = {
    BertModel: RMTBertModel,
    BertForSequenceClassification: RMTBertForSequenceClassification,
    BertForTokenClassification: RMTBertForTokenClassification,
    BertForQuestionAnswering: RMTBertForQuestionAnswering,
}
RMT_CLASSES = tuple(TEACHER_TO_RMT.values())


def is_bert_family(model: nn.Module) -> bool:
    return type(model) in TEACHER_TO_RMT or isinstance(model, RMT_CLASSES)


def _encoder(model: nn.Module) -> nn.Module:
    return model if isinstance(model, (BertModel, RMTBertModel)) else model.bert


def _prefix(model: nn.Module) -> str:
    return "" if isinstance(model, (BertModel, RMTBertModel)) else "bert."


def _check_teacher_config(config) -> None:
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError("RMT-KD supports encoder-only BERT; this config is a decoder (is_decoder=True).")
    if not isinstance(config.hidden_act, str):
        raise ValueError("hidden_act must be a string name (e.g. 'gelu') so the compressed config can save it.")


def convert_bert_to_rmt(model: nn.Module) -> RMTBertPreTrainedModel:
    """Exact re-expression of a ``Bert*`` model as an ``RMTBert*`` model with identity bases."""
    if isinstance(model, RMT_CLASSES):
        return model
    rmt_class = TEACHER_TO_RMT.get(type(model))
    if rmt_class is None:
        supported = ", ".join(cls.__name__ for cls in TEACHER_TO_RMT)
        raise ValueError(f"RMT-KD's BERT surgery does not support {type(model).__name__}; supported: {supported}.")
    _check_teacher_config(model.config)
    teacher_fields = model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path"):
        teacher_fields.pop(key, None)
    config = RMTBertConfig(**teacher_fields)
    config.architectures = [rmt_class.__name__]
    student = rmt_class(config).to(dtype=next(model.parameters()).dtype)
    teacher_state = model.state_dict()
    state = {}
    for name in student.state_dict():
        if ".LayerNorm." in name:
            ln_prefix = name.rsplit(".", 1)[0]
            gamma, beta = teacher_state[f"{ln_prefix}.weight"], teacher_state[f"{ln_prefix}.bias"]
            state[f"{ln_prefix}.weight"] = torch.diag(gamma)
            state[f"{ln_prefix}.bias"] = beta.clone()
            state[f"{ln_prefix}.mean_direction"] = torch.ones_like(gamma)
            state[f"{ln_prefix}.gain_direction"] = gamma.clone()
        elif name in teacher_state:
            state[name] = teacher_state[name].clone()
    student.load_state_dict(state, strict=False)
    missing = set(student.state_dict()) - set(state)
    if missing - {n for n in missing if n.endswith("position_ids")}:
        raise ValueError(f"Teacher weights missing for {sorted(missing)}")
    return student.eval() if not model.training else student


def bert_taps(model: RMTBertPreTrainedModel) -> list[ActivationTap]:
    """Hooks for every LayerNorm boundary (input and output) and every FFN intermediate."""
    prefix = _prefix(model)
    taps = [
        ActivationTap("embeddings.pre_norm", f"{prefix}embeddings.LayerNorm", "input"),
        ActivationTap("boundary.0.norm_output", f"{prefix}embeddings.LayerNorm", "output"),
    ]
    for layer in range(model.config.num_hidden_layers):
        base = f"{prefix}encoder.layer.{layer}"
        for offset, norm in ((0, "attention.output.LayerNorm"), (1, "output.LayerNorm")):
            boundary = 2 * layer + offset
            taps.append(ActivationTap(f"boundary.{boundary}.residual_sum", f"{base}.{norm}", "input"))
            taps.append(ActivationTap(f"boundary.{boundary + 1}.norm_output", f"{base}.{norm}", "output"))
        taps.append(ActivationTap(f"ffn.{layer}", f"{base}.intermediate", "output"))
    return taps


def _trace_normalised(covariance: torch.Tensor) -> torch.Tensor:
    return covariance / covariance.trace().clamp_min(1e-300)


def bert_sites(model: RMTBertPreTrainedModel, accumulators: dict[str, CovarianceAccumulator]) -> list[Site]:
    """Embedding, residual-boundary and FFN sites from the calibration accumulators."""
    num_layers = model.config.num_hidden_layers
    pre_norm = accumulators["embeddings.pre_norm"]
    vocabulary = _encoder(model).embeddings.word_embeddings.weight.detach().to(torch.float64).cpu()
    vocabulary_covariance = vocabulary.T @ vocabulary / vocabulary.shape[0]
    sites = [
        Site(
            "embeddings",
            "embedding",
            _trace_normalised(pre_norm.covariance()) + _trace_normalised(vocabulary_covariance),
            pre_norm.num_samples + vocabulary.shape[0],
        )
    ]
    for boundary in range(2 * num_layers + 1):
        norm_output = accumulators[f"boundary.{boundary}.norm_output"]
        covariance = _trace_normalised(norm_output.covariance())
        residual_sum = accumulators.get(f"boundary.{boundary}.residual_sum")
        if residual_sum is not None:  # the residual stream also carries the next LayerNorm's input
            covariance = covariance + _trace_normalised(residual_sum.covariance())
        sites.append(Site(f"boundary.{boundary}", "residual", covariance, norm_output.num_samples))
    for layer in range(num_layers):
        ffn = accumulators[f"ffn.{layer}"]
        sites.append(Site(f"ffn.{layer}", "ffn", ffn.covariance(), ffn.num_samples, mean=ffn.mean()))
    return sites


class _Rewriter:
    """Applies new bases to an ``RMTBert*`` state dict in float64."""

    def __init__(self, state: dict[str, torch.Tensor], prefix: str):
        self.source = state
        self.prefix = prefix
        self.state: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor:
        return self.source[self.prefix + name].to(torch.float64)

    def set(self, name: str, value: torch.Tensor) -> None:
        self.state[self.prefix + name] = value

    def lifted_norm(self, name: str, basis_in: torch.Tensor, basis_out: torch.Tensor) -> None:
        self.set(f"{name}.weight", basis_out @ self.get(f"{name}.weight") @ basis_in.T)
        self.set(f"{name}.mean_direction", basis_in @ self.get(f"{name}.mean_direction"))
        self.set(f"{name}.gain_direction", basis_out @ self.get(f"{name}.gain_direction"))
        self.set(f"{name}.bias", basis_out @ self.get(f"{name}.bias"))

    def read(self, name: str, basis_in: torch.Tensor) -> None:
        """A dense that reads the stream: ``W Q_inᵀ``."""
        self.set(f"{name}.weight", self.get(f"{name}.weight") @ basis_in.T)
        self.set(f"{name}.bias", self.get(f"{name}.bias"))

    def write(self, name: str, basis_out: torch.Tensor, weight=None, bias=None) -> None:
        """A dense that writes the stream: ``Q_out W``."""
        weight = self.get(f"{name}.weight") if weight is None else weight
        bias = self.get(f"{name}.bias") if bias is None else bias
        self.set(f"{name}.weight", basis_out @ weight)
        self.set(f"{name}.bias", basis_out @ bias)


def _ffn_rewrite(rewriter: _Rewriter, layer: int, analysis: SiteAnalysis, basis_mid: torch.Tensor) -> None:
    base = f"encoder.layer.{layer}"
    width = analysis.kept_width
    kept = select_neurons(analysis, width)
    site = analysis.site
    mixing, intercept = least_squares_compensation(
        site.covariance.numpy(), site.mean.numpy(), kept, ridge=analysis.extra.get("ridge", 1e-8)
    )
    mixing, intercept = torch.from_numpy(mixing), torch.from_numpy(intercept)
    kept_index = torch.from_numpy(kept)
    rewriter.set(
        f"{base}.intermediate.dense.weight",
        rewriter.get(f"{base}.intermediate.dense.weight")[kept_index] @ basis_mid.T,
    )
    rewriter.set(f"{base}.intermediate.dense.bias", rewriter.get(f"{base}.intermediate.dense.bias")[kept_index])
    output_weight = rewriter.get(f"{base}.output.dense.weight")
    rewriter.write(
        f"{base}.output.dense",
        basis_mid,
        weight=output_weight @ mixing,
        bias=rewriter.get(f"{base}.output.dense.bias") + output_weight @ intercept,
    )
    analysis.extra["kept_neurons"] = kept.tolist()


def compressed_config(model: RMTBertPreTrainedModel, widths: dict[str, int]) -> RMTBertConfig:
    """The config of ``model`` cut to ``widths`` (site name -> kept width)."""
    num_layers = model.config.num_hidden_layers
    config = RMTBertConfig.from_dict(model.config.to_dict())
    config.embedding_size = widths["embeddings"]
    config.boundary_sizes = [widths[f"boundary.{b}"] for b in range(2 * num_layers + 1)]
    config.intermediate_sizes = [widths[f"ffn.{layer}"] for layer in range(num_layers)]
    config.hidden_size = config.boundary_sizes[-1]
    return config


def layer_stages(model: RMTBertPreTrainedModel) -> list[list[str]]:
    """Sites grouped by layer, shallow to deep: the embeddings (and their LayerNorm output) first."""
    stages = [["embeddings", "boundary.0"]]
    for layer in range(model.config.num_hidden_layers):
        stages.append([f"boundary.{2 * layer + 1}", f"ffn.{layer}", f"boundary.{2 * layer + 2}"])
    return stages


def apply_bert_bases(model: RMTBertPreTrainedModel, analyses: dict[str, SiteAnalysis]) -> RMTBertPreTrainedModel:
    """A new model of the same class whose widths are ``analyses[site].kept_width``."""
    config = model.config
    num_layers = config.num_hidden_layers
    prefix = _prefix(model)
    dtype = next(model.parameters()).dtype
    rewriter = _Rewriter({k: v.detach().cpu() for k, v in model.state_dict().items()}, prefix)
    bases = [torch.from_numpy(analyses[f"boundary.{b}"].basis()) for b in range(2 * num_layers + 1)]
    embedding_basis = torch.from_numpy(analyses["embeddings"].basis())

    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        rewriter.set(f"embeddings.{table}.weight", rewriter.get(f"embeddings.{table}.weight") @ embedding_basis.T)
    rewriter.lifted_norm("embeddings.LayerNorm", embedding_basis, bases[0])
    for layer in range(num_layers):
        base = f"encoder.layer.{layer}"
        basis_in, basis_mid, basis_out = bases[2 * layer], bases[2 * layer + 1], bases[2 * layer + 2]
        for projection in ("query", "key", "value"):
            rewriter.read(f"{base}.attention.self.{projection}", basis_in)
        rewriter.write(f"{base}.attention.output.dense", basis_in)
        rewriter.lifted_norm(f"{base}.attention.output.LayerNorm", basis_in, basis_mid)
        _ffn_rewrite(rewriter, layer, analyses[f"ffn.{layer}"], basis_mid)
        rewriter.lifted_norm(f"{base}.output.LayerNorm", basis_mid, basis_out)
    if f"{prefix}pooler.dense.weight" in rewriter.source:
        rewriter.read("pooler.dense", bases[-1])

    widths = {name: analysis.kept_width for name, analysis in analyses.items()}
    new_config = compressed_config(model, widths)
    compressed = type(model)(new_config)
    state = {name: tensor.to(dtype) for name, tensor in rewriter.state.items()}
    for name, tensor in model.state_dict().items():  # heads: read the last boundary or pass through
        if name in state or name.startswith(prefix + "embeddings.position_ids"):
            continue
        if name in ("classifier.weight", "qa_outputs.weight") and not isinstance(
            model, RMTBertForSequenceClassification
        ):
            state[name] = (tensor.to(torch.float64) @ bases[-1].T).to(dtype)
        else:
            state[name] = tensor.detach().cpu().clone()
    compressed.load_state_dict(state, strict=True)
    compressed.to(next(model.parameters()).device)
    return compressed.train(model.training)


class BertSurgery:
    """``ArchitectureSurgery`` for BERT encoders."""

    name = "bert"

    def prepare(self, model: nn.Module) -> RMTBertPreTrainedModel:
        return convert_bert_to_rmt(model)

    def taps(self, model: RMTBertPreTrainedModel) -> list[ActivationTap]:
        return bert_taps(model)

    def sites(self, model, accumulators) -> list[Site]:
        return bert_sites(model, accumulators)

    def apply(self, model, analyses) -> RMTBertPreTrainedModel:
        return apply_bert_bases(model, analyses)

    def compressed_config(self, model, widths: dict[str, int]) -> RMTBertConfig:
        return compressed_config(model, widths)

    def stages(self, model) -> list[list[str]]:
        return layer_stages(model)

    def widths(self, model) -> dict:
        config = model.config
        return {
            "embedding_size": config.embedding_size,
            "boundary_sizes": list(config.boundary_sizes),
            "intermediate_sizes": list(config.intermediate_sizes),
        }

    def example_inputs(self, model, batch_size: int, size: int | None = None) -> dict[str, torch.Tensor]:
        """Random token ids (batch_size, size) and an all-ones mask (the models skip it, as BERT does)."""
        config = model.config
        maximum = getattr(config, "max_position_embeddings", None) or 128
        length = maximum if size is None else min(size, maximum)
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(1, config.vocab_size, (batch_size, length), generator=generator)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def lift_hidden_states(self, hidden_states: tuple[torch.Tensor, ...], analyses) -> list[torch.Tensor]:
        """Map the compressed model's per-layer hidden states back to the input model's coordinates."""
        bases = [torch.from_numpy(analyses[f"boundary.{2 * i}"].basis()) for i in range(len(hidden_states))]
        return [
            states.to(torch.float64) @ basis.to(states.device)
            for states, basis in zip(hidden_states, bases, strict=True)
        ]


__all__ = [
    "BertSurgery",
    "apply_bert_bases",
    "bert_sites",
    "bert_taps",
    "convert_bert_to_rmt",
    "is_bert_family",
]
