"""MiniMind-V's processor for transformers' AutoProcessor (shipped in an export by export_model.py, like
modeling_minimind_v.py): the tokenizer, CLIP's image preprocessing (vision.pixels_of: the same pixels training
saw) and the chat template, so that

    processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    inputs = processor(images=[image], text=processor.apply_chat_template(messages), return_tensors="pt")
    model.generate(**inputs, max_new_tokens=64)

gives input_ids (the image as its 50-token placeholder), attention_mask and pixel_values. One image per
prompt row.
"""
from transformers import BatchFeature, ProcessorMixin

from .LMConfig import IMAGE_MARKER, IMAGE_PLACEHOLDER
from .tokenizer import CHAT_TEMPLATE
from .vision import pixels_of

class MiniMindVProcessor(ProcessorMixin):
    attributes = ["tokenizer"]
    tokenizer_class = "AutoTokenizer"

    def __init__(self, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(tokenizer, chat_template=chat_template or CHAT_TEMPLATE, **kwargs)

    def __call__(self, images=None, text=None, return_tensors="pt", **kwargs) -> BatchFeature:
        """input_ids/attention_mask for `text` (a string or a list; `<image>` marks where each image goes) and
        pixel_values for `images` (PIL images, one per text)."""
        texts = [text] if isinstance(text, str) else list(text or [])
        texts = [t.replace(IMAGE_MARKER, IMAGE_PLACEHOLDER) for t in texts]
        kwargs.setdefault("add_special_tokens", False)  # the chat format writes its own <s> and </s>
        kwargs["padding"] = kwargs.get("padding") or len(texts) > 1
        kwargs["padding_side"] = "left"  # generation continues every row from its last column
        data = dict(self.tokenizer(texts, return_tensors=return_tensors, **kwargs)) if texts else {}
        if images is not None:
            images = [images] if not isinstance(images, (list, tuple)) else images
            flat = [im for item in images for im in (item if isinstance(item, (list, tuple)) else [item])]
            data["pixel_values"] = pixels_of(flat)
        return BatchFeature(data=data)

    def apply_chat_template(self, conversation, chat_template=None, tokenize=False, add_generation_prompt=True,
                            **kwargs):
        """The prompt text of a conversation (ending with the assistant prefix unless add_generation_prompt is
        False), in tokenizer.py's format."""
        return super().apply_chat_template(conversation, chat_template=chat_template, tokenize=tokenize,
                                           add_generation_prompt=add_generation_prompt, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)
