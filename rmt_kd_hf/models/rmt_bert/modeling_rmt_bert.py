"""PyTorch BERT with per-boundary widths chosen by RMT-KD.

This file travels with every compressed checkpoint so that ``trust_remote_code=True`` loads it without
``rmt_kd_hf`` installed: it imports only torch, the public transformers API and its sibling config.

Shapes: ``batch`` x ``seq`` tokens; the residual stream after boundary ``b`` has ``config.boundary_sizes[b]``
coordinates (the teacher's stream expressed in an orthonormal basis of its kept directions).
"""

import torch
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from .configuration_rmt_bert import (
    RMTBertConfig,
    RMTDistilBertConfig,
    RMTElectraConfig,
    RMTRobertaConfig,
    RMTXLMRobertaConfig,
)


class RMTLiftedLayerNorm(nn.Module):
    """LayerNorm of the teacher's ``norm_size``-wide stream, applied to its ``in_features`` kept coordinates.

    With orthonormal bases ``P_in`` (in x norm) and ``P_out`` (out x norm) and ``x = P_inᵀ u``:
    ``P_out LN(x) = W u / s + b`` with ``m = cᵀu / norm``, ``s = sqrt(|u|² / norm - m² + eps)``,
    ``W = P_out diag(γ) (I - 11ᵀ/norm) P_inᵀ`` (the centring folded in), ``c = P_in 1``, ``b = P_out β``. Exact for
    ``x`` in the span of ``P_in``; a per-coordinate LayerNorm in the reduced basis would not be. One GEMM plus
    per-token statistics.

    ``centred=False`` is format 1: it stores the uncentred ``P_out diag(γ) P_inᵀ`` and ``g = P_out γ``
    (``gain_direction``) and computes ``(W u - m g) / s + b``.
    """

    def __init__(self, in_features: int, out_features: int, norm_size: int, eps: float, centred: bool = False):
        super().__init__()
        self.norm_size = norm_size
        self.eps = eps
        self.centred = centred
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.mean_direction = nn.Parameter(torch.empty(in_features))
        if not centred:
            self.gain_direction = nn.Parameter(torch.empty(out_features))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mean = hidden_states @ self.mean_direction / self.norm_size
        variance = torch.linalg.vecdot(hidden_states, hidden_states) / self.norm_size - mean * mean
        inv_std = torch.rsqrt(variance.clamp_min(0.0) + self.eps).unsqueeze(-1)
        mixed = nn.functional.linear(hidden_states, self.weight)
        if not self.centred:
            mixed = mixed - mean.unsqueeze(-1) * self.gain_direction
        return torch.addcmul(self.bias, mixed, inv_std)


def _lifted_norm(
    config: RMTBertConfig, in_features: int, out_features: int, norm_size: int | None = None
) -> RMTLiftedLayerNorm:
    centred = config.rmt_kd_format_version >= 2
    norm_size = config.norm_size if norm_size is None else norm_size
    return RMTLiftedLayerNorm(in_features, out_features, norm_size, config.layer_norm_eps, centred)


class RMTBertEmbeddings(nn.Module):
    """Word + position + token-type embeddings of width ``embedding_size``, then a lifted LayerNorm.

    With ``word_embedding_rank`` set, the word table is ``(vocab_size, rank)`` and ``word_embeddings_projection``
    maps it to ``embedding_size``; ``inputs_embeds`` then has ``rank`` features, as the table's rows do.
    """

    def __init__(self, config: RMTBertConfig):
        super().__init__()
        width = config.embedding_size
        rank = config.word_embedding_rank
        self.word_embeddings = nn.Embedding(config.vocab_size, rank or width, padding_idx=config.pad_token_id)
        self.word_embeddings_projection = nn.Linear(rank, width, bias=False) if rank else None
        # RoBERTa counts positions from pad_token_id + 1; its padding position is pad_token_id
        self.padding_idx = config.pad_token_id if config.position_ids_from_padding else None
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, width, padding_idx=self.padding_idx)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, width)
        self.LayerNorm = _lifted_norm(config, width, config.boundary_sizes[0], config.embedding_norm_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.register_buffer(
            "position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)), persistent=False
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        if self.word_embeddings_projection is not None:
            inputs_embeds = self.word_embeddings_projection(inputs_embeds)
        seq_length = inputs_embeds.shape[1]
        if position_ids is None and self.padding_idx is not None:
            position_ids = self._positions_after_padding(input_ids, seq_length, inputs_embeds.device)
        elif position_ids is None:
            position_ids = self.position_ids[:, :seq_length]
        if token_type_ids is None or self.token_type_embeddings.num_embeddings == 1:
            # one token type (RoBERTa, DistilBERT): every token has it, whatever ids a BERT tokenizer sent
            token_type_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        embeddings = inputs_embeds + self.token_type_embeddings(token_type_ids)
        embeddings = embeddings + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))

    def _positions_after_padding(self, input_ids: torch.Tensor | None, seq_length: int, device) -> torch.Tensor:
        """(batch, seq) RoBERTa position ids: non-padding tokens count from ``padding_idx + 1``, padding tokens sit
        at ``padding_idx``; without ``input_ids`` (``inputs_embeds``), every token counts."""
        if input_ids is None:
            return torch.arange(seq_length, device=device)[None] + self.padding_idx + 1
        mask = input_ids.ne(self.padding_idx).int()
        return (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + self.padding_idx


class RMTBertSelfAttention(nn.Module):
    """Multi-head attention reading a ``boundary_sizes[2l]``-wide stream; keeps the teacher's softmax scale."""

    def __init__(self, config: RMTBertConfig, layer_idx: int):
        super().__init__()
        width = config.boundary_sizes[2 * layer_idx]
        self.num_attention_heads = config.num_attention_heads
        self.query_key_head_size = config.query_key_head_sizes[layer_idx]
        self.value_head_size = config.value_head_sizes[layer_idx]
        self.scaling = config.attention_scale
        self.query = nn.Linear(width, self.num_attention_heads * self.query_key_head_size)
        self.key = nn.Linear(width, self.num_attention_heads * self.query_key_head_size)
        self.value = nn.Linear(width, self.num_attention_heads * self.value_head_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def _split_heads(self, states: torch.Tensor, head_size: int) -> torch.Tensor:
        batch_size, seq_length = states.shape[:2]
        return states.view(batch_size, seq_length, self.num_attention_heads, head_size).transpose(1, 2)

    def _project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys, values (batch, seq, heads · size). For inference, one GEMM on the concatenated weights
        (concatenated at each call, so it can never go stale; exporters fold it into one constant); in training or
        with hooks on the projections (calibration reads each output), one GEMM each."""
        layers = (self.query, self.key, self.value)
        hooked = any(layer._forward_hooks or layer._forward_pre_hooks for layer in layers)
        if torch.is_grad_enabled() or hooked or self.training:
            return tuple(layer(hidden_states) for layer in layers)
        weight = torch.cat([layer.weight for layer in layers])
        bias = torch.cat([layer.bias for layer in layers])
        sizes = [layer.out_features for layer in layers]
        return nn.functional.linear(hidden_states, weight, bias).split(sizes, dim=-1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        query, key, value = self._project(hidden_states)
        query = self._split_heads(query, self.query_key_head_size)
        key = self._split_heads(key, self.query_key_head_size)
        value = self._split_heads(value, self.value_head_size)
        dropout = self.dropout.p if self.training else 0.0
        if output_attentions:
            scores = torch.matmul(query, key.transpose(-1, -2)) * self.scaling
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = nn.functional.dropout(scores.softmax(-1), p=dropout, training=self.training)
            context = torch.matmul(probs, value)
        else:
            probs = None
            context = nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=self.scaling
            )
        context = context.transpose(1, 2).reshape(*hidden_states.shape[:2], -1)
        return context, probs


class RMTBertResidualOutput(nn.Module):
    """``LN(dense(x) + residual)``: the dense writes into the residual's basis, the LayerNorm lifts to the next."""

    def __init__(self, config: RMTBertConfig, in_features: int, residual_boundary: int):
        super().__init__()
        residual_width = config.boundary_sizes[residual_boundary]
        self.dense = nn.Linear(in_features, residual_width)
        self.LayerNorm = _lifted_norm(config, residual_width, config.boundary_sizes[residual_boundary + 1])
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class RMTBertAttention(nn.Module):
    def __init__(self, config: RMTBertConfig, layer_idx: int):
        super().__init__()
        self.self = RMTBertSelfAttention(config, layer_idx)
        heads_width = config.num_attention_heads * config.value_head_sizes[layer_idx]
        self.output = RMTBertResidualOutput(config, heads_width, residual_boundary=2 * layer_idx)

    def forward(self, hidden_states, attention_mask, output_attentions=False):
        context, probs = self.self(hidden_states, attention_mask, output_attentions)
        return self.output(context, hidden_states), probs


class RMTBertIntermediate(nn.Module):
    def __init__(self, config: RMTBertConfig, layer_idx: int):
        super().__init__()
        self.dense = nn.Linear(config.boundary_sizes[2 * layer_idx + 1], config.intermediate_sizes[layer_idx])
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class RMTBertLayer(nn.Module):
    def __init__(self, config: RMTBertConfig, layer_idx: int):
        super().__init__()
        self.attention = RMTBertAttention(config, layer_idx)
        self.intermediate = RMTBertIntermediate(config, layer_idx)
        self.output = RMTBertResidualOutput(
            config, config.intermediate_sizes[layer_idx], residual_boundary=2 * layer_idx + 1
        )

    def forward(self, hidden_states, attention_mask, output_attentions=False):
        attention_output, probs = self.attention(hidden_states, attention_mask, output_attentions)
        layer_output = self.output(self.intermediate(attention_output), attention_output)
        return layer_output, probs


class RMTBertEncoder(nn.Module):
    def __init__(self, config: RMTBertConfig):
        super().__init__()
        self.layer = nn.ModuleList([RMTBertLayer(config, i) for i in range(config.num_hidden_layers)])

    def forward(self, hidden_states, attention_mask, output_attentions=False, output_hidden_states=False):
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer_module in self.layer:
            hidden_states, probs = layer_module(hidden_states, attention_mask, output_attentions)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (probs,)
        return hidden_states, all_hidden_states, all_attentions


class RMTBertPooler(nn.Module):
    def __init__(self, config: RMTBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.boundary_sizes[-1], config.pooler_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


class RMTBertPreTrainedModel(PreTrainedModel):
    config_class = RMTBertConfig
    base_model_prefix = "bert"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _no_split_modules = ["RMTBertEmbeddings", "RMTBertLayer"]

    def _format_output(self, output, return_dict: bool | None):
        """A ``ModelOutput``, or its tuple when ``return_dict`` (or the config's default) is False."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, RMTLiftedLayerNorm):
            init_lifted_norm(module)
            return
        super()._init_weights(module)
        if isinstance(module, RMTBertEmbeddings):
            positions = torch.arange(module.position_ids.shape[-1]).expand((1, -1))
            _fill_unless_loaded(module.position_ids, positions)


def init_lifted_norm(module: RMTLiftedLayerNorm) -> None:
    """Identity bases: a plain LayerNorm (γ = 1, β = 0) on the first coordinates (weights not loaded only)."""
    weight = torch.eye(*module.weight.shape)
    if module.centred:
        weight -= 1.0 / module.norm_size
    else:
        _fill_unless_loaded(module.gain_direction, torch.ones(module.gain_direction.shape))
    _fill_unless_loaded(module.weight, weight)
    _fill_unless_loaded(module.bias, torch.zeros(module.bias.shape))
    _fill_unless_loaded(module.mean_direction, torch.ones(module.mean_direction.shape))


def _fill_unless_loaded(tensor: torch.Tensor, value: torch.Tensor) -> None:
    # from_pretrained marks loaded tensors; initialisation must not overwrite them.
    if not getattr(tensor, "_is_hf_initialized", False):
        tensor.copy_(value)


def _additive_attention_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(batch, seq) 1/0 mask -> (batch, 1, 1, seq) additive mask. No branch on the mask's values, so that exported
    graphs (ONNX, ``torch.export``) take any padding; without a mask nothing is added."""
    if attention_mask is None:
        return None
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class RMTBertModel(RMTBertPreTrainedModel):
    def __init__(self, config: RMTBertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = RMTBertEmbeddings(config)
        self.encoder = RMTBertEncoder(config)
        self.pooler = RMTBertPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        """Returns ``last_hidden_state`` (batch, seq, boundary_sizes[-1]) and ``pooler_output`` (batch, pooler_size);
        ``hidden_states[b]`` has ``boundary_sizes[2b]`` coordinates."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        embedding_output = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        mask = _additive_attention_mask(attention_mask, embedding_output.dtype)
        sequence_output, hidden_states, attentions = self.encoder(
            embedding_output, mask, output_attentions, output_hidden_states
        )
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        if not return_dict:
            return tuple(v for v in (sequence_output, pooled_output, hidden_states, attentions) if v is not None)
        return BaseModelOutputWithPooling(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            hidden_states=hidden_states,
            attentions=attentions,
        )


def _sequence_classification_loss(config, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    num_labels = config.num_labels
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        return MSELoss()(logits.squeeze(), labels.squeeze()) if num_labels == 1 else MSELoss()(logits, labels)
    if config.problem_type == "single_label_classification":
        return CrossEntropyLoss()(logits.view(-1, num_labels), labels.view(-1))
    return BCEWithLogitsLoss()(logits, labels)


class RMTClassificationHead(nn.Module):
    """RoBERTa's and ELECTRA's sequence-classification head: the first token, dropout, ``dense``, tanh (RoBERTa) or
    gelu (ELECTRA), dropout, ``out_proj``."""

    def __init__(self, config: RMTBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.boundary_sizes[-1], config.pooler_size)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.activation = nn.Tanh() if config.classifier_head == "dense_tanh" else ACT2FN["gelu"]
        self.out_proj = nn.Linear(config.pooler_size, config.num_labels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch, seq, boundary_sizes[-1]) -> (batch, num_labels)."""
        features = self.activation(self.dense(self.dropout(hidden_states[:, 0])))
        return self.out_proj(self.dropout(features))


class RMTBertForSequenceClassification(RMTBertPreTrainedModel):
    """The encoder under ``base_model_prefix`` (``bert``, ``roberta``, ``electra``, ``distilbert``) and the family's
    head (``config.classifier_head``): BERT's pooler and ``classifier``, ``RMTClassificationHead``, or DistilBERT's
    ``pre_classifier``, ReLU, dropout, ``classifier``."""

    def __init__(self, config: RMTBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        pooled = config.classifier_head == "pooler"
        setattr(self, self.base_model_prefix, RMTBertModel(config, add_pooling_layer=pooled))
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        if pooled:
            self.dropout = nn.Dropout(dropout)
            self.classifier = nn.Linear(config.pooler_size, config.num_labels)
        elif config.classifier_head == "pre_classifier_relu":
            self.pre_classifier = nn.Linear(config.boundary_sizes[-1], config.pooler_size)
            self.dropout = nn.Dropout(dropout)
            self.classifier = nn.Linear(config.pooler_size, config.num_labels)
        else:
            self.classifier = RMTClassificationHead(config)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ) -> tuple | SequenceClassifierOutput:
        """``logits`` (batch, num_labels); ``loss`` when ``labels`` (batch,) are given."""
        outputs = self.base_model(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            output_attentions,
            output_hidden_states,
            return_dict=True,
        )
        if self.config.classifier_head == "pooler":
            logits = self.classifier(self.dropout(outputs.pooler_output))
        elif self.config.classifier_head == "pre_classifier_relu":
            features = nn.functional.relu(self.pre_classifier(outputs.last_hidden_state[:, 0]))
            logits = self.classifier(self.dropout(features))
        else:
            logits = self.classifier(outputs.last_hidden_state)
        loss = _sequence_classification_loss(self.config, logits, labels) if labels is not None else None
        output = SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return self._format_output(output, return_dict)


class RMTBertForTokenClassification(RMTBertPreTrainedModel):
    def __init__(self, config: RMTBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        setattr(self, self.base_model_prefix, RMTBertModel(config, add_pooling_layer=False))
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.boundary_sizes[-1], config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ) -> tuple | TokenClassifierOutput:
        """``logits`` (batch, seq, num_labels); ``loss`` when ``labels`` (batch, seq) are given."""
        outputs = self.base_model(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            output_attentions,
            output_hidden_states,
            return_dict=True,
        )
        logits = self.classifier(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            loss = CrossEntropyLoss()(logits.view(-1, self.num_labels), labels.view(-1))
        output = TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return self._format_output(output, return_dict)


class RMTBertForQuestionAnswering(RMTBertPreTrainedModel):
    def __init__(self, config: RMTBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        setattr(self, self.base_model_prefix, RMTBertModel(config, add_pooling_layer=False))
        self.qa_outputs = nn.Linear(config.boundary_sizes[-1], config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        start_positions=None,
        end_positions=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ) -> tuple | QuestionAnsweringModelOutput:
        """``start_logits`` and ``end_logits`` (batch, seq); ``loss`` when both positions (batch,) are given."""
        outputs = self.base_model(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            output_attentions,
            output_hidden_states,
            return_dict=True,
        )
        start_logits, end_logits = self.qa_outputs(outputs.last_hidden_state).split(1, dim=-1)
        start_logits, end_logits = start_logits.squeeze(-1).contiguous(), end_logits.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored_index = start_logits.size(1)
            loss_fct = CrossEntropyLoss(ignore_index=ignored_index)
            start_loss = loss_fct(start_logits, start_positions.clamp(0, ignored_index))
            end_loss = loss_fct(end_logits, end_positions.clamp(0, ignored_index))
            loss = (start_loss + end_loss) / 2
        output = QuestionAnsweringModelOutput(
            loss=loss,
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return self._format_output(output, return_dict)


# The other post-LayerNorm families: the same layers under their own prefix, config and Auto registration.


class RMTRobertaModel(RMTBertModel):
    config_class, base_model_prefix = RMTRobertaConfig, "roberta"


class RMTRobertaForSequenceClassification(RMTBertForSequenceClassification):
    config_class, base_model_prefix = RMTRobertaConfig, "roberta"


class RMTRobertaForTokenClassification(RMTBertForTokenClassification):
    config_class, base_model_prefix = RMTRobertaConfig, "roberta"


class RMTRobertaForQuestionAnswering(RMTBertForQuestionAnswering):
    config_class, base_model_prefix = RMTRobertaConfig, "roberta"


class RMTXLMRobertaModel(RMTBertModel):
    config_class, base_model_prefix = RMTXLMRobertaConfig, "roberta"


class RMTXLMRobertaForSequenceClassification(RMTBertForSequenceClassification):
    config_class, base_model_prefix = RMTXLMRobertaConfig, "roberta"


class RMTXLMRobertaForTokenClassification(RMTBertForTokenClassification):
    config_class, base_model_prefix = RMTXLMRobertaConfig, "roberta"


class RMTXLMRobertaForQuestionAnswering(RMTBertForQuestionAnswering):
    config_class, base_model_prefix = RMTXLMRobertaConfig, "roberta"


class RMTElectraModel(RMTBertModel):
    """ELECTRA's encoder has no pooler."""

    config_class, base_model_prefix = RMTElectraConfig, "electra"

    def __init__(self, config: RMTElectraConfig, add_pooling_layer: bool = False):
        super().__init__(config, add_pooling_layer)


class RMTElectraForSequenceClassification(RMTBertForSequenceClassification):
    config_class, base_model_prefix = RMTElectraConfig, "electra"


class RMTElectraForTokenClassification(RMTBertForTokenClassification):
    config_class, base_model_prefix = RMTElectraConfig, "electra"


class RMTElectraForQuestionAnswering(RMTBertForQuestionAnswering):
    config_class, base_model_prefix = RMTElectraConfig, "electra"


class RMTDistilBertModel(RMTBertModel):
    """DistilBERT's encoder has no pooler (nor token types: a one-row zero table)."""

    config_class, base_model_prefix = RMTDistilBertConfig, "distilbert"

    def __init__(self, config: RMTDistilBertConfig, add_pooling_layer: bool = False):
        super().__init__(config, add_pooling_layer)


class RMTDistilBertForSequenceClassification(RMTBertForSequenceClassification):
    config_class, base_model_prefix = RMTDistilBertConfig, "distilbert"


class RMTDistilBertForTokenClassification(RMTBertForTokenClassification):
    config_class, base_model_prefix = RMTDistilBertConfig, "distilbert"


class RMTDistilBertForQuestionAnswering(RMTBertForQuestionAnswering):
    config_class, base_model_prefix = RMTDistilBertConfig, "distilbert"


FAMILY_CLASSES = {  # model_type -> (base, sequence, token, question answering)
    "rmt_bert": (
        RMTBertModel,
        RMTBertForSequenceClassification,
        RMTBertForTokenClassification,
        RMTBertForQuestionAnswering,
    ),
    "rmt_roberta": (
        RMTRobertaModel,
        RMTRobertaForSequenceClassification,
        RMTRobertaForTokenClassification,
        RMTRobertaForQuestionAnswering,
    ),
    "rmt_xlm_roberta": (
        RMTXLMRobertaModel,
        RMTXLMRobertaForSequenceClassification,
        RMTXLMRobertaForTokenClassification,
        RMTXLMRobertaForQuestionAnswering,
    ),
    "rmt_electra": (
        RMTElectraModel,
        RMTElectraForSequenceClassification,
        RMTElectraForTokenClassification,
        RMTElectraForQuestionAnswering,
    ),
    "rmt_distilbert": (
        RMTDistilBertModel,
        RMTDistilBertForSequenceClassification,
        RMTDistilBertForTokenClassification,
        RMTDistilBertForQuestionAnswering,
    ),
}


__all__ = [
    "FAMILY_CLASSES",
    "RMTClassificationHead",
    "RMTDistilBertForQuestionAnswering",
    "RMTDistilBertForSequenceClassification",
    "RMTDistilBertForTokenClassification",
    "RMTDistilBertModel",
    "RMTElectraForQuestionAnswering",
    "RMTElectraForSequenceClassification",
    "RMTElectraForTokenClassification",
    "RMTElectraModel",
    "RMTRobertaForQuestionAnswering",
    "RMTRobertaForSequenceClassification",
    "RMTRobertaForTokenClassification",
    "RMTRobertaModel",
    "RMTXLMRobertaForQuestionAnswering",
    "RMTXLMRobertaForSequenceClassification",
    "RMTXLMRobertaForTokenClassification",
    "RMTXLMRobertaModel",
    "RMTBertForQuestionAnswering",
    "RMTBertForSequenceClassification",
    "RMTBertForTokenClassification",
    "RMTBertModel",
    "RMTBertPreTrainedModel",
]
