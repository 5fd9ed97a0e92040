"""MiniMind-V for the Hugging Face Auto classes. export_model.py copies model/ (which imports nothing outside
itself) into an exported directory, so that

    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)

builds the same MiniMindVLM (as `model.model`) with the same weights. `generate` takes PIL images (encoded
by the CLIP tower the export points to) or ready `image_features`; `chat` wraps prompt building and
decoding for one question about one image, through the repository's one inference engine (engine.py).
"""
import os
from typing import Optional

import torch
from transformers import PretrainedConfig, PreTrainedModel

from .engine import ChatEngine
from .LMConfig import IMAGE_MARKER, LMConfig
from .model import MiniMindVLM
from .vision import encode_images, load_vision_model, pixels_of


class MiniMindVConfig(PretrainedConfig):
    """LMConfig's fields as a transformers config, plus where the CLIP tower is."""
    model_type = "minimind_v"

    def __init__(self, lm_config: Optional[dict] = None, vision_model: str = "", **kwargs):
        kwargs.setdefault("tie_word_embeddings", False)  # MiniMindVLM ties its own embedding and output
        super().__init__(**kwargs)
        self.lm_config = dict(lm_config or {})
        self.vision_model = vision_model


class MiniMindVForCausalLM(PreTrainedModel):
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

    def forward(self, input_ids, image_features=None, labels=None, attention_mask=None, **kwargs):
        return self.model(input_ids, image_features, labels=labels, attention_mask=attention_mask)

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

    @torch.no_grad()
    def encode_images(self, images):
        """(n, 50, 768) features for a list of PIL images."""
        return encode_images(self.vision_tower(), pixels_of(images))

    # -- generation -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, input_ids, images=None, image_features=None, attention_mask=None, max_new_tokens=128,
                 temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0, eos_token_id=None,
                 generator=None):
        """New token ids, (batch, n_new), as MiniMindVLM.generate. Each row's prompt holds one 50-token
        placeholder per image; give the images (a list per row, or one image per row) or their features."""
        if images is not None:
            rows = [im if isinstance(im, (list, tuple)) else [im] for im in images]
            image_features = [self.encode_images(r) if r else None for r in rows]
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        return self.model.generate(input_ids, image_features, attention_mask=attention_mask,
                                   max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                   repetition_penalty=repetition_penalty, eos_token_id=2 if eos is None else eos,
                                   generator=generator)

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
