"""Export a MiniMind-V checkpoint as a Hugging Face model directory that loads with the Auto classes.

  python export_model.py --ckpt out/512_vlm_sft --out export/minimind-v-512
  python export_model.py --ckpt out/512_vlm_sft.pth --out export/minimind-v-512 --copy_vision

The directory holds config.json, generation_config.json (the chat sampling defaults), model.safetensors (the
decoder under upstream's parameter names, prefixed `model.`), the tokenizer, a processor (processor_config.json,
chat template), the modeling code (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText and
AutoProcessor through auto_map), a model card (README.md) and the CLIP tower: a copy (--copy_vision) or its
path. Use it like this (the model card has the full snippet):

  model = AutoModelForCausalLM.from_pretrained("export/minimind-v-512", trust_remote_code=True)
  processor = AutoProcessor.from_pretrained("export/minimind-v-512", trust_remote_code=True)
  inputs = processor(images=[image], text=processor.apply_chat_template(messages), return_tensors="pt")
  model.generate(**inputs, max_new_tokens=64, do_sample=False)      # transformers' own generate
  pipeline("image-text-to-text", model="export/minimind-v-512", trust_remote_code=True)
  model.chat(processor.tokenizer, image, "What is in the image?")  # through the repository's engine

Every script that takes --ckpt (training's --init_from too) also takes such a directory, so it converts back
by use; its model.safetensors is the checkpoint's state dict with every key prefixed `model.` (strip it for a
file upstream's code loads). The export's README.md is a model card with a runnable snippet; with
--copy_vision the directory is ready for `huggingface-cli upload`.
"""
import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from transformers import GenerationConfig

from model.checkpoint import load_vlm, resolve_checkpoint, save_weights
from model.cli import HelpFormatter, add_model_args
from model.processing_minimind_v import MiniMindVProcessor
from model.tokenizer import DEFAULT_TOKENIZER, load_tokenizer
from model.vision import DEFAULT_VISION_MODEL, load_vision_model

MODEL_DIR = Path(__file__).resolve().parent / "model"
MODEL_CARD = """---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [minimind-v, vision-language, custom_code]
---
# {name}

MiniMind-V: a {params:.1f}M-parameter MiniMind decoder (dim {dim}, {n_layers} layers) that sees through a frozen
CLIP ViT-B/32 (50 image tokens of width 768, one linear projector). Exported by export_model.py from
`{source}`. The CLIP tower is {vision}.

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
print(pipe(text=messages, max_new_tokens=64, do_sample=False)[0]["generated_text"][-1]["content"])
```

`model.safetensors` holds the decoder under upstream MiniMind-V's parameter names, each prefixed `model.`:
strip the prefix for a `.safetensors`/`.pth` state dict that upstream's code loads with strict=True.
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p, ckpt_help="checkpoint to export (.safetensors, .pth, or a stem)", runtime=False)
    p.add_argument("--out", required=True, help="directory to write (created; existing files are replaced)")
    p.add_argument("--copy_vision", action="store_true", help="copy the CLIP tower into the export (else: its path)")
    p.add_argument("--onnx", action="store_true", help="also write onnx/ (vision tower + projector, and the decoder "
                   "with explicit past keys/values) for scripts/onnx_chat.py, which runs without PyTorch")
    return p.parse_args(argv)


def export(ckpt, out, tokenizer_dir=DEFAULT_TOKENIZER, vision_model=DEFAULT_VISION_MODEL, copy_vision=False,
           onnx=False):
    tokenizer = load_tokenizer(tokenizer_dir)
    ckpt = resolve_checkpoint(ckpt)
    model, cfg = load_vlm(ckpt, tokenizer)
    if not os.path.isdir(vision_model):
        raise SystemExit(f"CLIP directory {vision_model} does not exist (pass --vision_model)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
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
        "source_checkpoint": str(ckpt),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    # the stock generate's defaults: the chat settings the repository's engine uses
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=0.65, top_p=0.85,
                     max_new_tokens=256).save_pretrained(out)
    save_weights({f"model.{k}": v for k, v in model.state_dict().items()}, out / "model.safetensors")
    (out / "README.md").write_text(MODEL_CARD.format(
        name=out.name, params=model.num_parameters() / 1e6, dim=cfg.dim, n_layers=cfg.n_layers, source=Path(ckpt).name,
        path=str(out), vision="in `vision/` (copied)" if copy_vision else
        f"read from `{vision_ref}` (export with --copy_vision before uploading with `huggingface-cli upload`)"))
    if onnx:
        from model.onnx_export import export_onnx
        export_onnx(model, load_vision_model(vision_model), tokenizer, out / "onnx")
    return out


def main(argv=None):
    args = parse_args(argv)
    try:
        out = export(args.ckpt, args.out, args.tokenizer, args.vision_model, args.copy_vision, args.onnx)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"exported {resolve_checkpoint(args.ckpt)} to {out}/ (AutoModelForCausalLM.from_pretrained("
          f"'{out}', trust_remote_code=True))", file=sys.stderr)


if __name__ == "__main__":
    main()
