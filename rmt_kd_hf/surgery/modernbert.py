"""RMT-KD surgery for ModernBERT, a pre-LayerNorm encoder (``ModernBertModel`` and its task heads).

Pre-LayerNorm layers read the residual stream through a LayerNorm and add their output to it, so the stream keeps
one basis from the embeddings to ``final_norm`` (as SliceGPT rotates it): one ``"residual"`` site, from the
covariances of the stream at every layer's input and at ``final_norm``, each normalised by its trace. The rest:

* LayerNorms that read the stream are lifted (``W Q_inᵀ``, ``c' = Q_in c``) and keep their full output, so the
  attention (fused ``Wqkv``, RoPE on the teacher's head size, local and global layers), the MLP input and the head
  are untouched; layer 0 has no LayerNorm before its attention, so its ``Wqkv`` reads the stream (``W Q_inᵀ``);
* the denses that write the stream (``attn.Wo``, ``mlp.Wo``) write ``Q W``;
* GeGLU: neurons are kept in pairs (row ``i`` of both halves of ``Wi``), chosen from the covariance of the gated
  product that ``mlp.Wo`` reads, the dropped ones reconstructed by least squares in ``mlp.Wo`` (and its bias);
* embeddings: one basis for the token table before the embedding LayerNorm, from calibration tokens plus the
  table's rows, as for BERT.

Compressed models are ``RMTModernBert*`` (``model_type="rmt_modernbert"``) and can be compressed again.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import (
    ModernBertForQuestionAnswering,
    ModernBertForSequenceClassification,
    ModernBertForTokenClassification,
    ModernBertModel,
)

from ..calibration import ActivationTap
from ..models.rmt_bert.configuration_rmt_modernbert import RMT_MODERNBERT_FORMAT_VERSION, RMTModernBertConfig
from ..models.rmt_bert.modeling_rmt_modernbert import MODERNBERT_CLASSES
from ..spectral import CovarianceAccumulator
from .base import (
    Site,
    SiteAnalysis,
    StateRewriter,
    embedding_site,
    neuron_reduction,
    random_token_inputs,
    trace_normalised,
)

TEACHER_CLASSES = (
    ModernBertModel,
    ModernBertForSequenceClassification,
    ModernBertForTokenClassification,
    ModernBertForQuestionAnswering,
)
TEACHER_TO_RMT = dict(zip(TEACHER_CLASSES, MODERNBERT_CLASSES, strict=True))


def is_modernbert_family(model: nn.Module) -> bool:
    return type(model) in TEACHER_TO_RMT or isinstance(model, MODERNBERT_CLASSES)


def _prefix(model: nn.Module) -> str:
    return "" if isinstance(model, ModernBertModel) else "model."


def _stream_norms(num_layers: int) -> list[str]:
    """The LayerNorms that read the residual stream (layer 0 has no attention LayerNorm)."""
    norms = [f"layers.{layer}.attn_norm" for layer in range(1, num_layers)]
    return norms + [f"layers.{layer}.mlp_norm" for layer in range(num_layers)] + ["final_norm"]


def convert_modernbert_to_rmt(model: nn.Module) -> nn.Module:
    """Exact re-expression of a ``ModernBert*`` model as its ``RMTModernBert*`` model with identity bases."""
    if isinstance(model, MODERNBERT_CLASSES):
        return model
    rmt_class = TEACHER_TO_RMT[type(model)]
    fields = model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path"):
        fields.pop(key, None)
    config = RMTModernBertConfig(**fields)
    config.architectures = [rmt_class.__name__]
    student = rmt_class(config).to(dtype=next(model.parameters()).dtype)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    prefix, width = _prefix(model), model.config.hidden_size
    for norm in ["embeddings.norm", *_stream_norms(model.config.num_hidden_layers)]:
        gamma = state[f"{prefix}{norm}.weight"]
        beta = state.pop(f"{prefix}{norm}.bias", torch.zeros_like(gamma))
        # diag(γ) (I - 11ᵀ/d): the LayerNorm's centring folded into its mixing weight
        state[f"{prefix}{norm}.weight"] = torch.diag(gamma) - gamma[:, None] / width
        state[f"{prefix}{norm}.bias"] = beta
        state[f"{prefix}{norm}.mean_direction"] = torch.ones_like(gamma)
    for layer in range(model.config.num_hidden_layers):  # the MLP output gets a bias (least-squares intercepts)
        name = f"{prefix}layers.{layer}.mlp.Wo.bias"
        state.setdefault(name, torch.zeros(width, dtype=state[f"{prefix}layers.{layer}.mlp.Wo.weight"].dtype))
    student.load_state_dict(state, strict=True)
    return student.train(model.training)


def modernbert_taps(model: nn.Module) -> list[ActivationTap]:
    """The embedding LayerNorm's input, the stream at every layer's input and at ``final_norm``, and every
    layer's gated GeGLU product (the input of ``mlp.Wo``)."""
    prefix = _prefix(model)
    taps = [ActivationTap("embeddings.pre_norm", f"{prefix}embeddings.norm", "input")]
    for layer in range(model.config.num_hidden_layers):
        taps.append(ActivationTap(f"residual.{layer}", f"{prefix}layers.{layer}", "input"))
        taps.append(ActivationTap(f"ffn.{layer}", f"{prefix}layers.{layer}.mlp.Wo", "input"))
    taps.append(ActivationTap("residual.final", f"{prefix}final_norm", "input"))
    return taps


def _token_table(model: nn.Module) -> torch.Tensor:
    """(vocab, embedding_size) float64 token rows."""
    return model.get_input_embeddings().weight.detach().to(torch.float64).cpu()


def modernbert_sites(model: nn.Module, accumulators: dict[str, CovarianceAccumulator]) -> list[Site]:
    """The embedding site, the one residual-stream site and one neuron site per GeGLU."""
    num_layers = model.config.num_hidden_layers
    streams = [accumulators[f"residual.{layer}"] for layer in range(num_layers)] + [accumulators["residual.final"]]
    stream_covariance = sum(trace_normalised(stream.covariance()) for stream in streams)
    sites = [
        embedding_site(accumulators["embeddings.pre_norm"], _token_table(model)),
        Site("residual", "residual", stream_covariance, streams[0].num_samples),
    ]
    for layer in range(num_layers):
        ffn = accumulators[f"ffn.{layer}"]
        sites.append(Site(f"ffn.{layer}", "ffn", ffn.covariance(), ffn.num_samples, mean=ffn.mean()))
    return sites


def _round_up(width: int, dim: int, multiple: int) -> int:
    return min(dim, multiple * math.ceil(width / multiple))


def compressed_modernbert_config(model: nn.Module, widths: dict[str, int], width_multiple: int = 1):
    """The config of ``model`` cut to ``widths`` (site name -> kept width; missing sites keep theirs)."""
    config = RMTModernBertConfig.from_dict(model.config.to_dict())
    config.rmt_kd_format_version = RMT_MODERNBERT_FORMAT_VERSION
    config.embedding_size = _round_up(
        widths.get("embeddings", config.embedding_size), config.embedding_size, width_multiple
    )
    config.residual_size = _round_up(widths.get("residual", config.residual_size), config.residual_size, width_multiple)
    config.intermediate_sizes = [
        _round_up(widths.get(f"ffn.{layer}", size), size, width_multiple)
        for layer, size in enumerate(model.config.intermediate_sizes)
    ]
    return config


def _ffn_rewrite(rewriter: StateRewriter, layer: int, analysis: SiteAnalysis, stream_basis: torch.Tensor) -> None:
    """Keep ``analysis.kept_width`` GeGLU neurons (both halves of ``Wi``); ``mlp.Wo`` reconstructs the others."""
    base = f"layers.{layer}.mlp"
    kept_index, mixing, intercept = neuron_reduction(analysis)
    rows = torch.cat([kept_index, kept_index + analysis.site.dim])  # the input half, then the gate half
    rewriter.set(f"{base}.Wi.weight", rewriter.get(f"{base}.Wi.weight")[rows])
    if rewriter.has(f"{base}.Wi.bias"):
        rewriter.set(f"{base}.Wi.bias", rewriter.get(f"{base}.Wi.bias")[rows])
    rewriter.write_reconstructed(f"{base}.Wo", stream_basis, mixing, intercept)


def apply_modernbert_bases(model: nn.Module, analyses: dict[str, SiteAnalysis], width_multiple: int = 1) -> nn.Module:
    """A new model of the same class whose widths are ``analyses[site].kept_width`` (rounded up to a multiple of
    ``width_multiple``; the analyses are updated)."""
    config = model.config
    widths = {name: analysis.kept_width for name, analysis in analyses.items()}
    new_config = compressed_modernbert_config(model, widths, width_multiple)
    analyses["embeddings"].kept_width = new_config.embedding_size
    analyses["residual"].kept_width = new_config.residual_size
    for layer, size in enumerate(new_config.intermediate_sizes):
        analyses[f"ffn.{layer}"].kept_width = size
    prefix = _prefix(model)
    rewriter = StateRewriter({k: v.detach().cpu() for k, v in model.state_dict().items()}, prefix)
    stream = torch.from_numpy(analyses["residual"].basis())  # (new width, current width)
    embedding = torch.from_numpy(analyses["embeddings"].basis())
    full = torch.eye(config.hidden_size, dtype=torch.float64)  # lifted LayerNorms keep their full output
    rewriter.set("embeddings.tok_embeddings.weight", _token_table(model) @ embedding.T)
    rewriter.lifted_norm("embeddings.norm", embedding, stream, config.hidden_size)
    for norm in _stream_norms(config.num_hidden_layers):
        rewriter.lifted_norm(norm, stream, full, config.hidden_size)
    for layer in range(config.num_hidden_layers):
        if layer == 0:
            rewriter.read("layers.0.attn.Wqkv", stream)
        rewriter.write(f"layers.{layer}.attn.Wo", stream)
        _ffn_rewrite(rewriter, layer, analyses[f"ffn.{layer}"], stream)
    compressed = type(model)(new_config)
    dtype = next(model.parameters()).dtype
    state = {name: tensor.to(dtype) for name, tensor in rewriter.state.items()}
    for name, tensor in model.state_dict().items():  # attention projections, RoPE, heads: unchanged
        state.setdefault(name, tensor.detach().cpu().clone())
    compressed.load_state_dict(state, strict=True)
    compressed.to(next(model.parameters()).device)
    return compressed.train(model.training)


class ModernBertSurgery:
    """``ArchitectureSurgery`` for ModernBERT encoders.

    Args:
        width_multiple: round embedding, residual and GeGLU widths up to a multiple of this.
    """

    name = "modernbert"

    def __init__(self, width_multiple: int = 1, **unsupported):
        options = sorted(name for name, value in unsupported.items() if value)
        if options:
            raise ValueError(f"Surgery options {options} apply to the BERT-style encoders, not to ModernBERT.")
        if width_multiple < 1:
            raise ValueError(f"width_multiple must be >= 1, got {width_multiple}")
        self.width_multiple = width_multiple

    def prepare(self, model: nn.Module) -> nn.Module:
        return convert_modernbert_to_rmt(model)

    def taps(self, model) -> list[ActivationTap]:
        return modernbert_taps(model)

    def sites(self, model, accumulators) -> list[Site]:
        return modernbert_sites(model, accumulators)

    def apply(self, model, analyses) -> nn.Module:
        return apply_modernbert_bases(model, analyses, self.width_multiple)

    def compressed_config(self, model, widths: dict[str, int]) -> RMTModernBertConfig:
        return compressed_modernbert_config(model, widths, self.width_multiple)

    def stages(self, model) -> list[list[str]]:
        """The embeddings and the stream first, then each layer's GeGLU."""
        return [["embeddings", "residual"]] + [[f"ffn.{layer}"] for layer in range(model.config.num_hidden_layers)]

    def widths(self, model) -> dict:
        config = model.config
        return {
            "embedding_size": config.embedding_size,
            "residual_size": config.residual_size,
            "intermediate_sizes": list(config.intermediate_sizes),
        }

    def example_inputs(self, model, batch_size: int, size: int | None = None) -> dict[str, torch.Tensor]:
        """Random token ids (batch_size, size) without padding and an all-ones mask."""
        longest = model.config.max_position_embeddings
        return random_token_inputs(model.config, batch_size, longest if size is None else min(size, longest))


__all__ = ["ModernBertSurgery", "apply_modernbert_bases", "convert_modernbert_to_rmt", "is_modernbert_family"]
