"""MiniMind-V for the Hugging Face Auto classes. export_model.py copies model/ (which imports nothing outside
itself) into an exported directory, so that

    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)

builds the same MiniMindVLM (as `model.model`) with the same weights. It is a transformers causal LM:
`forward` takes `pixel_values` (CLIP-preprocessed, encoded by the tower the export points to) or ready
`image_features`, and a transformers Cache, so transformers' own `generate` works (greedy, sampling, beam search,
streamers, generation_config.json's defaults) and returns prompt + answer. `chat` answers one question about
one PIL image through the repository's one inference engine (engine.py).
"""
import os
from typing import Optional

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .engine import ChatEngine
from .LMConfig import IMAGE_MARKER, LMConfig
from .model import MiniMindVLM
from .vision import encode_images, load_vision_model, pixels_of


class MiniMindVConfig(PretrainedConfig):
    """LMConfig's fields as a transformers config, plus where the CLIP tower is."""
    model_type = "minimind_v"

    def __init__(self, lm_config: Optional[dict] = None, vision_model: str = "", use_cache: bool = True, **kwargs):
        kwargs.setdefault("tie_word_embeddings", False)  # MiniMindVLM ties its own embedding and output
        super().__init__(**kwargs)
        self.use_cache = use_cache
        self.lm_config = dict(lm_config or {})
        self.vision_model = vision_model
        # transformers' names for the sizes its generation utilities (caches) read
        lm = LMConfig.from_dict(self.lm_config) if self.lm_config else LMConfig()
        self.hidden_size, self.num_hidden_layers, self.vocab_size = lm.dim, lm.n_layers, lm.vocab_size
        self.num_attention_heads, self.num_key_value_heads = lm.n_heads, lm.n_kv_heads
        self.max_position_embeddings = lm.max_seq_len


class CacheView:
    """A transformers Cache (what the stock `generate` creates, and reorders for beam search) seen through
    model.py's KVCache interface: update(layer, k, v) with (B, T, H, D) tensors, `length`, advance(n)."""

    def __init__(self, cache):
        self.cache, self.length = cache, cache.get_seq_length()

    def update(self, layer, k, v):
        k, v = self.cache.update(k.transpose(1, 2), v.transpose(1, 2), layer)  # transformers: (B, H, T, D)
        return k.transpose(1, 2), v.transpose(1, 2)

    def advance(self, n):
        self.length += n


class MiniMindVForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MiniMindVConfig
    base_model_prefix = "model"
    _no_split_modules = ["MiniMindBlock"]

    def __init__(self, config: MiniMindVConfig):
        super().__init__(config)
        self.model = MiniMindVLM(LMConfig.from_dict(config.lm_config))
        self._vision = None
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        model.model.init_buffers(model.model.output.weight.device)  # derived buffers are not in the weights
        model._export_dir = args[0] if args and os.path.isdir(str(args[0])) else None
        return model.eval()

    def _init_weights(self, module):
        pass  # every parameter comes from model.safetensors

    def forward(self, input_ids, attention_mask=None, past_key_values=None, pixel_values=None, image_features=None,
                labels=None, use_cache=None, **kwargs):
        """transformers' causal-LM forward: the images as `pixel_values` (one (3, 224, 224) image per row, CLIP
        preprocessing) or as ready `image_features` (one (50, 768) block per row, or a list per row); a
        transformers Cache in `past_key_values` (created when use_cache and none is given)."""
        if pixel_values is not None and image_features is None:
            image_features = encode_images(self.vision_tower(), pixel_values)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        cache = None if past_key_values is None else CacheView(past_key_values)
        out = self.model(input_ids, image_features, labels=labels, attention_mask=attention_mask, past_key_values=cache)
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits, past_key_values=past_key_values)

    def prepare_inputs_for_generation(self, *args, image_features=None, is_first_iteration=False, **kwargs):
        """The stock one, and image_features only with the prompt (pixel_values are dropped after it by
        transformers itself): later steps feed one token and the cache."""
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if is_first_iteration or not kwargs.get("use_cache", True):
            inputs["image_features"] = image_features
        return inputs

    # -- images ---------------------------------------------------------------------------------------

    def vision_tower(self):
        """The frozen CLIP tower the export points to (a copy inside the export, or a path), loaded once."""
        if self._vision is None:
            path = self.config.vision_model
            if not os.path.isabs(path) and getattr(self, "_export_dir", None):
                path = os.path.join(self._export_dir, path)
            # Kept outside nn.Module's registry: the tower is not part of this model's weights (save_pretrained
            # would otherwise write it into model.safetensors).
            self.__dict__["_vision"] = load_vision_model(path, self.model.output.weight.device)
        return self._vision

    @staticmethod
    def preprocess_images(images) -> torch.Tensor:
        """(n, 3, 224, 224) pixel_values for a list of PIL images (CLIP's preprocessing)."""
        return pixels_of(images)

    @torch.no_grad()
    def encode_images(self, images):
        """(n, 50, 768) features for a list of PIL images."""
        return encode_images(self.vision_tower(), pixels_of(images))

    # -- generation: transformers' own generate (GenerationMixin) over forward above ---------------------

    def chat(self, tokenizer, image, question: str, max_new_tokens=128, temperature=0.0, top_p=None,
             **kwargs) -> str:
        """One answer about one PIL image (greedy unless temperature is given); other settings (top_k,
        repetition_penalty, seed) as ChatEngine.generate takes them."""
        if getattr(self, "_engine", None) is None or self._engine.tokenizer is not tokenizer:
            self._engine = ChatEngine(self.model, tokenizer, self.vision_tower())
        engine = self._engine
        content = question if IMAGE_MARKER in question else f"{IMAGE_MARKER}\n{question}"
        answer = engine.generate([{"role": "user", "content": content}], engine.encode([image]),
                                 max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, **kwargs)
        return answer.text().strip()
