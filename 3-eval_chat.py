"""Chat with a trained MiniMind-V, or score it on a labelled set.

  python 3-eval_chat.py                                       # stream an answer for every image in dataset/eval_images
  python 3-eval_chat.py --interactive --image cat.jpg         # type questions about one image (multi-turn)
  python 3-eval_chat.py --data_path eval.jsonl --images_dir dataset/demo/images --out preds.jsonl
  python 3-eval_chat.py ... --control blank                   # same, every image replaced by a uniform grey one

Batch mode prints one JSON line at the end: {"n": ..., "exact": ..., "contains": ...}.
"""
import argparse
import json
import os
import sys
from collections import Counter

import torch
from PIL import Image
from tqdm import tqdm

from model.engine import build_prompt, features_for, generate_batch, stream_text
from model.checkpoint import load_vlm, resolve_checkpoint
from model.checkpoint import CheckpointError
from trainer.data_check import (ROLES, DataError, Problem, RecordError, add_check_args, check_record, image_paths,
                              read_records)
from trainer.data import DEFAULT_TOKENIZER, image_cache_key, load_image, load_tokenizer
from trainer.feature_cache import FeatureCache
from model.LMConfig import IMAGE_MARKER
from model.vision import (DEFAULT_VISION_MODEL, BadImage, autocast_dtype, load_vision_model,
                                preprocess_image, vision_fingerprint)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")


def parse_args(argv=None):
    class Fmt(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Fmt)
    a = p.add_argument
    a("--ckpt", default=None, help="checkpoint .safetensors or .pth (None: out/{dim}[_moe]_vlm_{sft|pretrain})")
    a("--dim", type=int, default=512, help="picks the default --ckpt")
    a("--use_moe", action="store_true", help="picks the default --ckpt")
    a("--model_mode", type=int, default=1, choices=[0, 1], help="picks the default --ckpt: 0 pretrain, 1 sft")
    a("--vision_model", default=DEFAULT_VISION_MODEL, help="local CLIP ViT-B/32 directory")
    a("--tokenizer", default=DEFAULT_TOKENIZER)
    a("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    a("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"], help="image encoder autocast")
    a("--image_dir", default="dataset/eval_images", help="chat mode: answer --prompt for every image here")
    a("--prompt", default="<image>\nDescribe this image.", help="chat mode question ('<image>' marks the image)")
    a("--interactive", action="store_true", help="type questions about --image (multi-turn)")
    a("--image", default=None, help="interactive mode: the image (None: the first in --image_dir)")
    a("--data_path", default=None, help="batch mode: LLaVA-format file whose last answer is the reference")
    a("--images_dir", default=".", help="batch mode: directory the records' image paths are relative to")
    a("--out", default=None, help="batch mode: predictions JSONL (None: next to --ckpt)")
    a("--control", choices=["none", "blank"], default="none",
      help="blank: replace every image by a uniform grey one (a no-vision baseline)")
    a("--batch_size", type=int, default=32, help="batch mode: prompts generated together")
    a("--limit", type=int, default=0, help="batch mode: only the first N records (0: all)")
    a("--feature_cache", default="out/feature_cache", help="batch mode: image feature cache ('' to disable)")
    a("--max_new_tokens", type=int, default=256)
    a("--temperature", type=float, default=None, help="None: 0.65 in chat modes, 0 (greedy) in batch mode")
    a("--top_k", type=int, default=None)
    a("--top_p", type=float, default=0.85)
    a("--repetition_penalty", type=float, default=1.0)
    a("--seed", type=int, default=0)
    a("--on_bad_sample", choices=["error", "skip"], default="error",
      help="batch mode: a bad record or image stops the run with a message naming it (error), or is written to "
           "the predictions file with its error and left out of the score (skip)")
    add_check_args(p)  # --max_image_pixels
    return p.parse_args(argv)


def grey_pixels():
    return preprocess_image(Image.new("RGB", (224, 224), (128, 128, 128)))


def sampling(args, batch_mode):
    t = args.temperature if args.temperature is not None else (0.0 if batch_mode else 0.65)
    return dict(max_new_tokens=args.max_new_tokens, temperature=t, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty)


def to_messages(turns):
    return [{"role": ROLES[t["from"]], "content": t["value"]} for t in turns]


def run_batch(args, model, tokenizer, vision_model, dtype, device, max_seq_len):
    entries, problems = read_records(args.data_path)
    entries = entries[:args.limit] if args.limit else entries
    good = []
    for e in entries:
        found = check_record(e, args.data_path)  # also: every record ends with an answer to score against
        problems += found
        good += [] if found else [e]
    if problems and args.on_bad_sample == "error":
        raise DataError(problems, f"{len(problems)} bad record(s); fix them or pass --on_bad_sample skip")
    cache = None
    if args.feature_cache and args.control == "none":
        cache = FeatureCache(args.feature_cache, vision_fingerprint(args.vision_model))
    grey = features_for(vision_model, grey_pixels()[None], dtype)[0] if args.control == "blank" else None
    out_path = args.out or os.path.splitext(args.ckpt)[0] + f"_preds{'_blank' if grey is not None else ''}.jsonl"
    n = exact = contains = 0
    skipped = []

    def skip(fout, problem):  # skip mode: the record is in the predictions file with what is wrong, unscored
        skipped.append(problem)
        fout.write(json.dumps({"id": problem.id, "line": problem.line, "kind": problem.kind,
                               "error": problem.message()}, ensure_ascii=False) + "\n")

    with open(out_path, "w", encoding="utf-8") as fout:
        for p in problems:
            skip(fout, p)
        for start in tqdm(range(0, len(good), args.batch_size), desc="evaluating", unit="batch"):
            chunk, prompts, feats, refs = [], [], [], []
            for e in good[start:start + args.batch_size]:
                turns = e.record["conversations"]
                prompt = build_prompt(tokenizer, to_messages(turns[:-1]))
                n_tokens = len(tokenizer(prompt, add_special_tokens=False).input_ids)
                try:
                    if n_tokens >= max_seq_len:
                        raise RecordError("too_long", f"the prompt is {n_tokens} tokens (50 per image); the model "
                                                   f"reads at most {max_seq_len - 1} before answering")
                    paths = image_paths(e.record, args.images_dir)
                    if not paths:
                        f = None
                    elif grey is not None:
                        f = grey.expand(len(paths), -1, -1)
                    else:
                        pixels = torch.stack([load_image(p, args.max_image_pixels) for p in paths])
                        keys = [image_cache_key(p) for p in paths] if cache is not None else None
                        f = features_for(vision_model, pixels, dtype, cache, keys)
                except (BadImage, RecordError) as err:
                    problem = Problem(err.kind, args.data_path, e.line, e.id, str(err))
                    if args.on_bad_sample == "error":
                        fout.flush()
                        raise DataError([problem], f"bad record (predictions so far are in {out_path}; fix it or "
                                                   "pass --on_bad_sample skip)") from None
                    skip(fout, problem)
                    continue
                chunk.append(e)
                prompts.append(prompt)
                feats.append(f)
                refs.append(turns[-1]["value"].strip())
            answers = generate_batch(model, tokenizer, prompts, feats, device, **sampling(args, True)) if chunk else []
            for e, ref, ans in zip(chunk, refs, answers):
                hit, has = ans == ref, ref.lower() in ans.lower()
                n, exact, contains = n + 1, exact + hit, contains + has
                fout.write(json.dumps({"id": e.record.get("id"), "image": e.record.get("image"), "reference": ref,
                                       "prediction": ans, "exact": hit, "contains": has}, ensure_ascii=False) + "\n")
    print(f"predictions: {out_path}", file=sys.stderr)
    if skipped:
        kinds = ", ".join(f"{k} {c}" for k, c in Counter(p.kind for p in skipped).items())
        print(f"skipped {len(skipped)} bad record(s) ({kinds}); each is in the predictions file with its error",
              file=sys.stderr)
    print(json.dumps({"n": n, "exact": round(exact / max(n, 1), 4), "contains": round(contains / max(n, 1), 4),
                      "skipped": len(skipped)}))


def image_features_of(path, vision_model, dtype, control, max_pixels):
    pixels = grey_pixels() if control == "blank" else load_image(path, max_pixels)
    return features_for(vision_model, pixels[None], dtype)


def run_gallery(args, model, tokenizer, vision_model, dtype, device):
    files = sorted(f for f in os.listdir(args.image_dir) if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise SystemExit(f"no images in {args.image_dir}")
    prompt = args.prompt if IMAGE_MARKER in args.prompt else f"{IMAGE_MARKER}\n{args.prompt}"
    text = build_prompt(tokenizer, [{"role": "user", "content": prompt}])
    for f in files:
        try:
            feats = image_features_of(os.path.join(args.image_dir, f), vision_model, dtype, args.control,
                                      args.max_image_pixels)
        except BadImage as e:
            print(f"[{f}] skipped: {e}\n")
            continue
        print(f"[{f}] {prompt.replace(IMAGE_MARKER, '').strip()}\n🤖: ", end="", flush=True)
        for piece in stream_text(model, tokenizer, text, feats, device, **sampling(args, False)):
            print(piece, end="", flush=True)
        print("\n")


def run_interactive(args, model, tokenizer, vision_model, dtype, device):
    image = args.image
    if image is None:
        files = sorted(f for f in os.listdir(args.image_dir) if f.lower().endswith(IMAGE_EXTS))
        image = os.path.join(args.image_dir, files[0]) if files else None
    print("Type a question. /image PATH switches image (new conversation), /clear forgets, /exit quits.")
    history, feats = [], None
    while True:
        if feats is None and image:
            try:
                feats = image_features_of(image, vision_model, dtype, args.control, args.max_image_pixels)
                print(f"[image: {image}]")
            except BadImage as e:
                print(f"cannot use it: {e}. /image PATH picks another; questions go without an image.")
                image = None
        try:
            q = input("👶: ").strip()
        except EOFError:
            break
        if not q:
            continue
        if q == "/exit":
            break
        if q == "/clear":
            history = []
            continue
        if q.startswith("/image "):
            image, feats, history = q[7:].strip(), None, []
            continue
        content = q if history or feats is None else f"{IMAGE_MARKER}\n{q}"
        history.append({"role": "user", "content": content})
        print("🤖: ", end="", flush=True)
        answer = ""
        for piece in stream_text(model, tokenizer, build_prompt(tokenizer, history), feats, device,
                                 **sampling(args, False)):
            answer += piece
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": answer})


def main(argv=None):
    args = parse_args(argv)
    try:
        chat(args)
    except (DataError, CheckpointError, BadImage, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


def chat(args):
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if args.ckpt is None:
        moe = "_moe" if args.use_moe else ""
        args.ckpt = f"out/{args.dim}{moe}_vlm_{'sft' if args.model_mode == 1 else 'pretrain'}"
    args.ckpt = resolve_checkpoint(args.ckpt)
    tokenizer = load_tokenizer(args.tokenizer)
    model, cfg = load_vlm(args.ckpt, tokenizer, device)
    vision_model = load_vision_model(args.vision_model, device)
    dtype = autocast_dtype(device.type, args.dtype)
    print(f"MiniMind-V {args.ckpt}: {model.num_parameters() / 1e6:.2f}M parameters "
          f"(dim {cfg.dim}, {cfg.n_layers} layers)", file=sys.stderr)
    if args.data_path:
        run_batch(args, model, tokenizer, vision_model, dtype, device, cfg.max_seq_len)
    elif args.interactive:
        run_interactive(args, model, tokenizer, vision_model, dtype, device)
    else:
        run_gallery(args, model, tokenizer, vision_model, dtype, device)


if __name__ == "__main__":
    main()
