"""Qwen25VLModel: the vision tower, image embeddings scattered into the token embeddings, a megatron decoder.

Pipeline stages: the first holds the vision tower and the embeddings, the last the final norm and the
vocab-parallel output layer; every stage holds its slice of megatron's TransformerBlock and computes the
3-D M-RoPE angles from the position ids it is given. On the last stage `forward` returns vocab-parallel
logits [s, b, padded_vocab / tp]; `full_logits` gathers them to [b, s, vocab] at the true vocabulary size.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.transformer_block import TransformerBlock

from megatron_sayo.models.qwen25vl import cached_decoder, shared_prompt_attention
from megatron_sayo.models.qwen25vl.attention import AttentionState, CoreAttention
from megatron_sayo.models.qwen25vl.hf_config import Qwen25VLConfig, padded_vocab_size
from megatron_sayo.models.qwen25vl.rope import mrope_freqs, mrope_inv_freq, tokens_per_image
from megatron_sayo.models.qwen25vl.specs import decoder_layer_spec
from megatron_sayo.models.qwen25vl.vision import Qwen25VisionModel


class Qwen25VLModel(LanguageModule):
    """Qwen2.5-VL on megatron-core, for one (TP rank, PP stage)."""

    def __init__(self, hf: Qwen25VLConfig, config, *, pre_process: bool | None = None,
                 post_process: bool | None = None, layer_backend: str = "local", attention_backend: str = "sdpa",
                 vision_attention_backend: str = "sdpa", mass_kernel: str = "auto"):
        super().__init__(config)
        self.model_type = ModelType.encoder_or_decoder
        self.hf = hf
        self.pre_process = parallel_state.is_pipeline_first_stage() if pre_process is None else pre_process
        self.post_process = parallel_state.is_pipeline_last_stage() if post_process is None else post_process
        self.vocab_size = hf.text.vocab_size
        self.padded_vocab_size = padded_vocab_size(self.vocab_size, config.tensor_model_parallel_size)
        self.share_embeddings_and_output_weights = hf.text.tie_word_embeddings
        self.layer_backend = layer_backend
        # packed prompt-sharing rows: "split" (no dense mask, shared_prompt_attention.py), "masked" (the
        # segment mask, SDPA), "auto" = split on CUDA, masked elsewhere
        self.shared_form = "auto"
        self.register_buffer("inv_freq", mrope_inv_freq(hf.text.head_dim, hf.text.rope_theta), persistent=False)

        if self.pre_process:
            self.vision = Qwen25VisionModel(hf.vision, attn_impl=vision_attention_backend).to(config.params_dtype)
            self.embedding = LanguageModelEmbedding(config, self.padded_vocab_size, hf.text.max_position_embeddings,
                                                    position_embedding_type="none")
        self.decoder = TransformerBlock(config, decoder_layer_spec(layer_backend, attention_backend, mass_kernel),
                                        pre_process=self.pre_process, post_process=self.post_process)
        if self.post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, self.padded_vocab_size, config=config, init_method=config.init_method,
                bias=False, gather_output=False, tp_group=parallel_state.get_tensor_model_parallel_group(),
                skip_weight_param_allocation=self.pre_process and self.share_embeddings_and_output_weights)
        if self.pre_process or self.post_process:
            self._tie_embeddings()

    # ----------------------------------------------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand the previous stage's activations here."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def core_attentions(self) -> list[CoreAttention]:
        return [layer.self_attention.core_attention for layer in self.decoder.layers]

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              image_grid_thw: torch.Tensor | None, image_order: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with each <|image_pad|> replaced by its vision embedding, [s, b, h].

        `image_order`: the images (indices into image_grid_thw) in the order the <|image_pad|> slots use them,
        so an image several rows share (a prompt's G completions) goes through the vision tower once."""
        emb = self.embedding.word_embeddings(input_ids)
        is_image = input_ids == self.hf.tokens.image
        n_slots = int(is_image.sum())
        if pixel_values is not None and pixel_values.numel():
            image_embeds = self.vision(pixel_values.to(emb.dtype), image_grid_thw).to(emb.dtype)
            if image_order is not None:
                per_image = image_embeds.split(tokens_per_image(image_grid_thw, self.hf.vision.spatial_merge_size))
                image_embeds = torch.cat([per_image[i] for i in image_order.tolist()])
            if image_embeds.shape[0] != n_slots:
                raise ValueError(f"input_ids hold {n_slots} <|image_pad|> tokens but the images give "
                                 f"{image_embeds.shape[0]} embeddings (image_grid_thw {image_grid_thw.tolist()})")
            emb = emb.masked_scatter(is_image[..., None], image_embeds)
        elif n_slots:
            raise ValueError(f"input_ids hold {n_slots} <|image_pad|> tokens but no pixel_values were given")
        emb = emb.transpose(0, 1).contiguous()
        if self.config.sequence_parallel:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)
        return emb

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                state: AttentionState | None = None, logits_from: int | None = None,
                image_order: torch.Tensor | None = None, hidden_only: bool = False,
                shared_segments: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [b, s], position_ids [3, b, s], attention_mask bool [b, 1, s, sk] (True = masked) or None
        for plain causal. Returns vocab-parallel logits [s, b, V/tp] on the last stage, hidden [s, b, h] before.
        `logits_from`: compute logits only for positions [logits_from:] (prefill and scoring need no more).
        `image_order`: see `embed` (pixel_values / image_grid_thw then hold each distinct image once).
        `hidden_only`: skip the output layer, return the final hidden states (a decode step fed only for the
        attention rows the capture probe reads).
        `shared_segments`: long [b, S] segment ids of packed prompt-sharing rows (rl/shared_prompt.py) instead of
        attention_mask: the segment mask, or the split attention without one (`shared_form`)."""
        device = self.inv_freq.device  # callers may hand CPU batches to a GPU model: move them once, here
        input_ids, position_ids, attention_mask, pixel_values, image_grid_thw = (
            t.to(device) if t is not None else None
            for t in (input_ids, position_ids, attention_mask, pixel_values, image_grid_thw))
        state = state or AttentionState()
        if shared_segments is not None:
            form = self.shared_form if self.shared_form != "auto" else ("split" if device.type == "cuda" else "masked")
            if form == "masked":
                attention_mask = ~shared_prompt_attention.shared_allowed(shared_segments.to(device))[:, None]
            else:
                state.shared_segments = shared_segments
        for core in self.core_attentions():
            core.state = state
        hidden = self.embed(input_ids, pixel_values, image_grid_thw, image_order) if self.pre_process else None
        rotary = mrope_freqs(position_ids, self.inv_freq, self.hf.text.mrope_section)
        if state.kv_cache is not None and cached_decoder.supports(self):
            hidden = cached_decoder.run(self, hidden, rotary, attention_mask)
        else:
            hidden = self.decoder(hidden_states=hidden, attention_mask=attention_mask, rotary_pos_emb=rotary)
        if not self.post_process or hidden_only:
            return hidden
        if logits_from is not None and not self.config.sequence_parallel:
            hidden = hidden[logits_from:]
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden, weight=weight)
        return logits

    def full_logits(self, parallel_logits: torch.Tensor) -> torch.Tensor:
        """[s, b, V/tp] vocab-parallel logits -> [b, s, vocab] at the true vocabulary size (padding dropped)."""
        full = tensor_parallel.gather_from_tensor_model_parallel_region(parallel_logits)
        return full[..., :self.vocab_size].transpose(0, 1)

    def global_param_name(self, local_name: str) -> str:
        """state_dict name with the decoder's stage-local layer index replaced by the global one."""
        parts = local_name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(self.decoder.layers[int(parts[2])].layer_number - 1)
        return ".".join(parts)

    def _tie_embeddings(self) -> None:
        """Mark embedding/output weights; with tied weights across PP, copy the first stage's to the last."""
        if self.pre_process:
            self.embedding.word_embeddings.weight.is_embedding_or_output_parameter = True
        if self.post_process and self.output_layer.weight is not None:
            self.output_layer.weight.is_embedding_or_output_parameter = True
        if not self.share_embeddings_and_output_weights or self.config.pipeline_model_parallel_size == 1:
            if self.share_embeddings_and_output_weights:
                self.shared_embedding_or_output_weight().zero_out_wgrad = True
            return
        weight = self.shared_embedding_or_output_weight()
        weight.shared_embedding = True
        if self.post_process and not self.pre_process:
            weight.data.fill_(0)
            weight.shared = True
        if torch.distributed.is_initialized() and self._is_in_embd_group():
            torch.distributed.all_reduce(weight.data, group=self.embd_group)


def build_model(hf: Qwen25VLConfig, config, **kwargs) -> Qwen25VLModel:
    """This rank's model stage on the current device."""
    from megatron_sayo.distributed.runtime import device

    return Qwen25VLModel(hf, config, **kwargs).to(device())


def model_inputs(hf: Qwen25VLConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None) -> dict:
    """The forward kwargs for a processor batch (prefill): M-RoPE positions and the megatron mask."""
    from megatron_sayo.models.qwen25vl.attention import build_attention_mask
    from megatron_sayo.models.qwen25vl.rope import get_rope_index

    position_ids, _ = get_rope_index(input_ids, image_grid_thw, attention_mask, image_token_id=hf.tokens.image,
                                     vision_start_token_id=hf.tokens.vision_start,
                                     spatial_merge_size=hf.vision.spatial_merge_size)
    return dict(input_ids=input_ids, position_ids=position_ids,
                attention_mask=build_attention_mask(attention_mask, input_ids.shape[1]),
                pixel_values=pixel_values, image_grid_thw=image_grid_thw)
