"""Export a MiniMind-V checkpoint as a Hugging Face model directory.

  python export_model.py --ckpt out/512_vlm_sft --out export/minimind-v                   # stock LLaVA
  python export_model.py --ckpt out/512_vlm_sft --out export/minimind-v-llama --format llama
  python export_model.py --ckpt out/512_moe_vlm_sft --out export/minimind-v-moe --format minimind --copy_vision

--format llava (the default) writes a stock transformers LLaVA: LlavaForConditionalGeneration = the CLIP tower
(from --vision_model, inside model.safetensors) + the projector + the decoder as a Llama, with LlavaProcessor
(CLIPImageProcessor + the tokenizer with an added `<image>` token + MiniMind's chat template). No code ships in
the directory and nothing needs trust_remote_code; tools that know LLaVA directories can load it:

  model = AutoModelForImageTextToText.from_pretrained("export/minimind-v")
  processor = AutoProcessor.from_pretrained("export/minimind-v")
  pipe = pipeline("image-text-to-text", model="export/minimind-v")

--format llama writes the decoder alone as a stock LlamaForCausalLM (text only; what converters such as
llama.cpp's convert_hf_to_gguf.py take), plus the projector in minimind_v_projector.safetensors, which stock
tools ignore and the way back uses. --format minimind writes the earlier remote-code export (this repository's
modeling_minimind_v.py and processing_minimind_v.py, loaded with trust_remote_code=True): the one format that
holds mixture-of-experts checkpoints, which the stock formats refuse.

Each directory has config.json, model.safetensors, generation_config.json (the chat sampling defaults), the
tokenizer with the chat template, and a model card (README.md) with a runnable snippet. Every script that takes
--ckpt (training's --init_from too) also takes any of them, so a model fine-tuned elsewhere in transformers
comes back (model/hf_formats.py undoes the conversion).
"""
import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from model.checkpoint import load_vlm, resolve_checkpoint, save_weights, trained_context
from model.cli import HelpFormatter, add_model_args
from model.hf_formats import IMAGE_TOKEN, PROJECTOR_FILE, llama_config_fields, llava_config_fields, to_llama, to_llava
from model.images import CLIP_MEAN, CLIP_STD, IMAGE_SIZE
from model.LMConfig import N_IMAGE_TOKENS
from model.tokenizer import CHAT_TEMPLATE, DEFAULT_TOKENIZER, load_tokenizer
from model.vision import DEFAULT_VISION_MODEL, load_vision_model

MODEL_DIR = Path(__file__).resolve().parent / "model"
FORMATS = ("llava", "llama", "minimind")
CARD_HEADER = """---
library_name: transformers
pipeline_tag: {pipeline_tag}
tags: [minimind-v{tags}]
---
# {name}

MiniMind-V: a {params:.1f}M-parameter MiniMind decoder (dim {dim}, {n_layers} layers) that sees through a frozen
CLIP ViT-B/32 (50 image tokens of width 768, one linear projector). Exported by export_model.py from `{source}`.
"""
LLAVA_CARD = """
A stock `LlavaForConditionalGeneration` (CLIP vision tower + projector + Llama decoder, all in
`model.safetensors`) with `LlavaProcessor`: no custom code, no `trust_remote_code`.

```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
model = AutoModelForImageTextToText.from_pretrained("{path}")
processor = AutoProcessor.from_pretrained("{path}")
image = Image.open("cat.jpg")
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in the image?"}}]}}]
inputs = processor(images=[image], text=processor.apply_chat_template(messages, add_generation_prompt=True),
                   return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
pipe = pipeline("image-text-to-text", model="{path}")
messages[0]["content"][0]["image"] = image
reply = pipe(text=messages, max_new_tokens=64, generate_kwargs={{"do_sample": False}})
print(reply[0]["generated_text"][-1]["content"])
```

Each image is 50 `<image>` tokens (id {image_id}, added after MiniMind's vocabulary: every CLIP token of the
last layer, CLS included); its embedding row is zeros and `generation_config.json` suppresses it. The
processor gives the pixels the model was trained on with transformers' PIL backend (where torchvision is
installed, pass `backend="pil"` to `AutoProcessor.from_pretrained`: torchvision's bicubic resize differs a little).
"""
LLAMA_CARD = """
The text decoder alone as a stock `LlamaForCausalLM` (for text; the vision side is in the LLaVA export). The
projector is kept in `{projector}` (stock tools ignore it) so that the repository's scripts load this directory
back as the whole MiniMind-V.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{path}")
tokenizer = AutoTokenizer.from_pretrained("{path}")
prompt = tokenizer.apply_chat_template([{{"role": "user", "content": "Hello"}}], add_generation_prompt=True,
                                       tokenize=False)
inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

GGUF for llama.cpp: `python llama.cpp/convert_hf_to_gguf.py {path} --outfile {name}.gguf --outtype f16`.
"""
MINIMIND_CARD = """
Remote code: the model and processor are this repository's `modeling_minimind_v.py` and
`processing_minimind_v.py` (in this directory). The CLIP tower is {vision}.

```python
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor, pipeline
model = AutoModelForCausalLM.from_pretrained("{path}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{path}", trust_remote_code=True)
image = Image.open("cat.jpg")
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in the image?"}}]}}]
inputs = processor(images=[image], text=processor.apply_chat_template(messages), return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
pipe = pipeline("image-text-to-text", model="{path}", trust_remote_code=True)
messages[0]["content"][0]["image"] = image
reply = pipe(text=messages, max_new_tokens=64, generate_kwargs={{"do_sample": False}})
print(reply[0]["generated_text"][-1]["content"])
```

`model.safetensors` holds the decoder under upstream MiniMind-V's parameter names, each prefixed `model.`:
strip the prefix for a `.safetensors`/`.pth` state dict that upstream's code loads with strict=True.
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p, ckpt_help="checkpoint to export (.safetensors, .pth, a stem, or an export directory)",
                   runtime=False)
    p.add_argument("--out", required=True, help="directory to write (created; existing files are replaced)")
    p.add_argument("--format", default="llava", choices=FORMATS, help="llava: stock LlavaForConditionalGeneration "
                   "(the whole VLM, CLIP tower included); llama: stock LlamaForCausalLM (the text decoder); "
                   "minimind: remote code (trust_remote_code=True; the only one for MoE checkpoints)")
    p.add_argument("--copy_vision", action="store_true", help="--format minimind: copy the CLIP tower into the "
                   "export (else it records the tower's path); the llava format always holds the tower")
    p.add_argument("--onnx", action="store_true", help="also write onnx/ (vision tower + projector, and the decoder "
                   "with explicit past keys/values) for scripts/onnx_chat.py, which runs without PyTorch")
    return p.parse_args(argv)


def export(ckpt, out, tokenizer_dir=DEFAULT_TOKENIZER, vision_model=DEFAULT_VISION_MODEL, copy_vision=False,
           onnx=False, fmt="llava"):
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    if copy_vision and fmt != "minimind":
        raise ValueError(f"--copy_vision is for --format minimind (the {fmt} export "
                         f"{'always holds' if fmt == 'llava' else 'has no'} CLIP tower)")
    tokenizer = load_tokenizer(tokenizer_dir)
    ckpt = resolve_checkpoint(ckpt)
    model, cfg = load_vlm(ckpt, tokenizer)
    trained, _ = trained_context(ckpt)
    if trained:  # every format records the context as the length it was trained with (max_position_embeddings)
        cfg.max_seq_len = min(cfg.max_seq_len, trained)
    if cfg.use_moe and fmt != "minimind":
        raise ValueError(f"{ckpt} is a mixture-of-experts model: stock {fmt} has no MoE feed-forward; export it "
                         "with --format minimind (transformers' remote code, trust_remote_code=True)")
    if (fmt != "llama" or onnx) and not os.path.isdir(vision_model):
        raise FileNotFoundError(f"CLIP directory {vision_model} does not exist (pass --vision_model)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    card = dict(name=out.name, params=model.num_parameters() / 1e6, dim=cfg.dim, n_layers=cfg.n_layers,
                source=Path(ckpt).name, path=str(out))
    if fmt == "minimind":
        write_minimind(model, cfg, tokenizer, vision_model, copy_vision, out, str(ckpt), card)
    else:
        for code in MODEL_DIR.glob("*.py"):  # an earlier --format minimind export's code: nothing runs from here
            (out / code.name).unlink(missing_ok=True)
        (write_llava if fmt == "llava" else write_llama)(model, cfg, tokenizer_dir, vision_model, out, card)
    if onnx:
        from model.onnx_export import export_onnx
        export_onnx(model, load_vision_model(vision_model), tokenizer, out / "onnx")
    return out


def stock_tokenizer(tokenizer_dir, image_token=False):
    """The tokenizer as the stock exports ship it: MiniMind's chat template and, for LLaVA, the `<image>` special
    token after the vocabulary."""
    tokenizer = load_tokenizer(tokenizer_dir)
    if image_token:
        tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def finish_tokenizer_config(out):
    """tokenizer_config.json with left padding (batched generation continues every row from its last column),
    written so that transformers 4.x reads it too (serving engines pin their own version): the class by its 4.x
    name, the added special tokens under 4.x's key, no record of how this copy was read. transformers 5 reads
    it the same."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", padding_side="left")
    extra = config.pop("extra_special_tokens", None)
    if extra:
        config["additional_special_tokens"] = extra
    for key in ("is_local", "local_files_only", "backend"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def generation_config(tokenizer, suppress_tokens=None):
    """The stock generate's defaults: the chat settings the repository's engine uses."""
    from transformers import GenerationConfig
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=0.65, top_p=0.85,
                            max_new_tokens=256, suppress_tokens=suppress_tokens)


def write_llava(model, cfg, tokenizer_dir, vision_model, out, card):
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor
    tower = load_vision_model(vision_model)
    tokenizer = stock_tokenizer(tokenizer_dir, image_token=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    tensors = to_llava(model.state_dict(), cfg, tower.state_dict(), image_id)  # (refuses an <image> id elsewhere)
    vision_config = CLIPVisionConfig(**asdict(tower.config))  # load_vision_model checked: 50 tokens an image
    text_config = LlamaConfig(**llama_config_fields(cfg, image_id + 1, tokenizer.bos_token_id,
                                                    tokenizer.eos_token_id, tokenizer.pad_token_id))
    config = LlavaConfig(vision_config=vision_config, text_config=text_config,
                         **llava_config_fields(image_id, N_IMAGE_TOKENS))
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = "float32"
    config.save_pretrained(out)
    save_weights(tensors, out / "model.safetensors")
    generation_config(tokenizer, suppress_tokens=[image_id]).save_pretrained(out)
    # CLIP's preprocessing with the PIL backend: the pixels model/images.py gives, bit for bit
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                            image_mean=CLIP_MEAN.tolist(), image_std=CLIP_STD.tolist())
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=vision_config.patch_size, vision_feature_select_strategy="full",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN)
    processor.save_pretrained(out)
    finish_tokenizer_config(out)
    image_processor.save_pretrained(out)  # preprocessor_config.json too, for loaders that look there
    write_card(out, "image-text-to-text", "llava", card, LLAVA_CARD.format(image_id=image_id, **card))


def write_llama(model, cfg, tokenizer_dir, vision_model, out, card):
    from transformers import LlamaConfig
    tokenizer = stock_tokenizer(tokenizer_dir)
    config = LlamaConfig(**llama_config_fields(cfg, cfg.vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id,
                                               tokenizer.pad_token_id))
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "float32"
    config.save_pretrained(out)
    decoder, projector = to_llama(model.state_dict(), cfg)
    save_weights(decoder, out / "model.safetensors")
    save_weights(projector, out / PROJECTOR_FILE)
    generation_config(tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    finish_tokenizer_config(out)
    write_card(out, "text-generation", "llama", card, LLAMA_CARD.format(projector=PROJECTOR_FILE, **card))


def write_minimind(model, cfg, tokenizer, vision_model, copy_vision, out, source, card):
    import shutil
    from model.processing_minimind_v import MiniMindVProcessor
    for code in MODEL_DIR.glob("*.py"):  # model/ imports nothing outside itself: it ships as it is
        shutil.copyfile(code, out / code.name)
    tokenizer.save_pretrained(out)
    MiniMindVProcessor(tokenizer).save_pretrained(out)
    processor_config = out / "processor_config.json"  # AutoProcessor finds the class through auto_map
    entries = json.loads(processor_config.read_text()) if processor_config.is_file() else {}
    entries.update(processor_class="MiniMindVProcessor",
                   auto_map={"AutoProcessor": "processing_minimind_v.MiniMindVProcessor"})
    processor_config.write_text(json.dumps(entries, indent=2, ensure_ascii=False))
    if copy_vision:
        shutil.copytree(vision_model, out / "vision", dirs_exist_ok=True)
        vision_ref = "vision"
    else:
        vision_ref = str(Path(vision_model).resolve())
    config = {
        "model_type": "minimind_v",
        "architectures": ["MiniMindVForCausalLM"],
        "auto_map": {"AutoConfig": "modeling_minimind_v.MiniMindVConfig",
                     "AutoModelForCausalLM": "modeling_minimind_v.MiniMindVForCausalLM",
                     "AutoModelForImageTextToText": "modeling_minimind_v.MiniMindVForCausalLM"},
        "lm_config": cfg.to_dict(),
        "vision_model": vision_ref,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, "tie_word_embeddings": False, "torch_dtype": "float32",
        "source_checkpoint": source,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    generation_config(tokenizer).save_pretrained(out)
    save_weights({f"model.{k}": v for k, v in model.state_dict().items()}, out / "model.safetensors")
    vision = "in `vision/` (copied)" if copy_vision else \
        f"read from `{vision_ref}` (export with --copy_vision before uploading with `huggingface-cli upload`)"
    write_card(out, "image-text-to-text", "custom_code", card, MINIMIND_CARD.format(vision=vision, **card))


def write_card(out, pipeline_tag, tag, card, body):
    (out / "README.md").write_text(CARD_HEADER.format(pipeline_tag=pipeline_tag, tags=f", {tag}", **card) + body)


def main(argv=None):
    args = parse_args(argv)
    try:
        out = export(args.ckpt, args.out, args.tokenizer, args.vision_model, args.copy_vision, args.onnx, args.format)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    how = {"llava": f"AutoModelForImageTextToText.from_pretrained('{out}')",
           "llama": f"AutoModelForCausalLM.from_pretrained('{out}')",
           "minimind": f"AutoModelForCausalLM.from_pretrained('{out}', trust_remote_code=True)"}[args.format]
    print(f"exported {resolve_checkpoint(args.ckpt)} to {out}/ as {args.format} ({how})", file=sys.stderr)


if __name__ == "__main__":
    main()
