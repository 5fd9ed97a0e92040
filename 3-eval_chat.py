"""Chat with a trained MiniMind-V, or score it on a labelled set.

  python 3-eval_chat.py                                       # stream an answer for every image in dataset/eval_images
  python 3-eval_chat.py --interactive --image cat.jpg         # type questions about one image (multi-turn)
  python 3-eval_chat.py --data_path eval.jsonl --images_dir dataset/demo/images --out preds.jsonl
  python 3-eval_chat.py ... --control blank                   # same, every image replaced by a uniform grey one
  python 3-eval_chat.py ... --explain out/explain             # also: where each answer found its evidence

Batch mode prints one JSON line at the end: {"n": ..., "exact": ..., "contains": ...}.

Where did it look (--explain DIR): for every answer, each image's share of the answer's evidence on its 7x7
patches and its CLS token (gradient x input on the image tokens; model/relevance.py), computed after the answer.
Chat modes write a PNG of each answered image with its heatmap and the question and answer beneath. Batch mode
adds each image's grid to its prediction record, writes PNGs for the first --explain_pngs records, and, for
records that say where their object is ("mask": a greyscale image file per image, white on the object, as the
demo's held-out records do), adds to the summary "evidence": the share of the patches' evidence on the patches
the object covers (evidence_on_target) against the share of the image they make up (area_of_target), averaged
over the images; run it with and without --control blank to see how much of that the pixels explain.
"""
import argparse
import json
import os
import re
import sys
from collections import Counter

import torch
from PIL import Image
from tqdm import tqdm

from model.checkpoint import CheckpointError, resolve_checkpoint
from model.cli import HelpFormatter, add_max_image_pixels, add_model_args
from model.engine import ChatEngine, InputError, PromptTooLong
from model.LMConfig import IMAGE_MARKER
from model.images import BadImage, open_image_header, patch_coverage, read_image, read_mask
from model.relevance import draw_heatmap, evidence_on_target, summarize_evidence, target_patches
from model.vision import load_image, preprocess_image, vision_fingerprint
from trainer.feature_cache import FeatureCache, image_cache_key
from trainer.records import DataError, Problem, check_records, conversation_to_messages, image_paths, read_records

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p, ckpt_default=None, ckpt_help="checkpoint .safetensors or .pth, a stem, or an export directory "
                                                   "(None: out/{dim}[_moe]_vlm_{sft|pretrain})")
    a = p.add_argument
    a("--dim", type=int, default=512, help="picks the default --ckpt")
    a("--use_moe", action="store_true", help="picks the default --ckpt")
    a("--model_mode", type=int, default=1, choices=[0, 1], help="picks the default --ckpt: 0 pretrain, 1 sft")
    a("--image_dir", default="dataset/eval_images", help="chat mode: answer --prompt for every image here")
    a("--prompt", default="<image>\nDescribe this image.", help="chat mode question ('<image>' marks the image)")
    a("--interactive", action="store_true", help="type questions about --image (multi-turn)")
    a("--image", default=None, help="interactive mode: the image (None: the first in --image_dir)")
    a("--data_path", default=None, help="batch mode: LLaVA-format file whose last answer is the reference")
    a("--images_dir", default=".", help="batch mode: directory the records' image paths are relative to")
    a("--out", default=None, help="batch mode: predictions JSONL (None: next to --ckpt)")
    a("--control", choices=["none", "blank"], default="none",
      help="blank: replace every image by a uniform grey one (a no-vision baseline)")
    a("--batch_size", type=int, default=32, help="batch mode: answers decoded together")
    a("--limit", type=int, default=0, help="batch mode: only the first N records (0: all)")
    a("--feature_cache", default="out/feature_cache", help="batch mode: image feature cache ('' to disable)")
    a("--max_new_tokens", type=int, default=256, help="longest answer, in tokens")
    a("--temperature", type=float, default=None, help="None: 0.65 in chat modes, 0 (greedy) in batch mode")
    a("--top_k", type=int, default=None, help="sample from the k likeliest tokens only (None: off)")
    a("--top_p", type=float, default=0.85, help="sample from the smallest set of tokens with this probability")
    a("--repetition_penalty", type=float, default=1.0, help="> 1 makes tokens already in the text less likely")
    a("--seed", type=int, default=0, help="random seed of sampled answers (batch mode: record i uses seed + i)")
    a("--explain", default=None, metavar="DIR", help="where did it look: a PNG per answered image with its "
      "heatmap and the question and answer, in DIR; batch mode also adds the relevance grids to the predictions and "
      "the evidence on target to the summary (see above)")
    a("--explain_pngs", type=int, default=16, help="batch mode with --explain: PNGs for the first N records only "
      "(0: none; every record still gets its grid)")
    a("--on_bad_sample", choices=["error", "skip"], default="error",
      help="batch mode: a bad record or image stops the run with a message naming it (error), or is written to "
           "the predictions file with its error and left out of the score (skip)")
    add_max_image_pixels(p)
    return p.parse_args(argv)


def grey_image():
    return Image.new("RGB", (224, 224), (128, 128, 128))


def grey_pixels():
    return preprocess_image(grey_image())


def model_image(path, control, max_pixels):
    """The image the model is shown for `path`: the file's, or under --control blank the grey one."""
    return grey_image() if control == "blank" else read_image(path, f"image {path}", max_pixels)


def save_explanation(engine, args, name, messages, feats, images, answer, coverages=None) -> tuple:
    """Where `answer` found its evidence in each image (engine.explain), drawn as PNGs in args.explain (name.png,
    or name_1.png, name_2.png, ... for several images; images=None draws none), with the object's patches outlined
    and its evidence on target in the caption where its coverage is known. Returns the paths written, the
    relevances and each image's evidence on target (None where unknown)."""
    relevances = engine.explain(messages, feats, answer)
    coverages = coverages or [None] * len(relevances)
    on_target = [None if c is None else evidence_on_target(r, c) for r, c in zip(relevances, coverages)]
    if images is None:
        return [], relevances, on_target
    question = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    grey = " [the image replaced by grey: --control blank]" if args.control == "blank" else ""
    caption = f"Q: {question.replace(IMAGE_MARKER, '').strip()}{grey}\nA: {answer}"
    name = re.sub(r"[^\w.-]+", "_", str(name))
    paths = []
    for k, (image, relevance, coverage, found) in enumerate(zip(images, relevances, coverages, on_target)):
        target = None if found is None else target_patches(coverage)
        line = "" if found is None else (f"\nevidence on the object's patches (outlined): {found['evidence']:.0%}; "
                                         f"their share of the image: {found['area']:.0%}")
        path = os.path.join(args.explain, f"{name}.png" if len(images) == 1 else f"{name}_{k + 1}.png")
        draw_heatmap(image, relevance, caption + line, target).save(path)
        paths.append(path)
    return paths, relevances, on_target


def record_coverages(record, paths, images_dir):
    """Per image of a record, the (7, 7) share of each patch its object covers, from the record's "mask" (one file
    name, or a list aligned with "image"; relative to images_dir; null for an image without one), or None."""
    masks = record.get("mask")
    if masks is None:
        return [None] * len(paths)
    masks = [masks] if isinstance(masks, str) else masks
    if not isinstance(masks, list) or len(masks) != len(paths):
        raise BadImage("bad_mask", f"'mask' must name one mask file per image ({len(paths)}), got {masks!r}")
    coverages = []
    for mask, image in zip(masks, paths):
        if mask is None:
            coverages.append(None)
            continue
        with open_image_header(image, f"image {image}") as header:
            size = header.size
        mask_path = os.path.join(images_dir, mask)
        coverages.append(patch_coverage(read_mask(mask_path, size, f"mask {mask_path}")))
    return coverages


def sampling(args, batch_mode):
    t = args.temperature if args.temperature is not None else (0.0 if batch_mode else 0.65)
    return dict(max_new_tokens=args.max_new_tokens, temperature=t, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty)


def run_batch(args, engine):
    entries, problems = read_records(args.data_path)
    entries = entries[:args.limit] if args.limit else entries
    good, found = check_records(entries, args.data_path)  # also: every record ends with an answer to score against
    problems += found
    if problems and args.on_bad_sample == "error":
        raise DataError(problems, f"{len(problems)} bad record(s); fix them or pass --on_bad_sample skip")
    cache = None
    if args.feature_cache and args.control == "none":
        cache = FeatureCache(args.feature_cache, vision_fingerprint(args.vision_model))
    grey = engine.image_features(grey_pixels()[None])[0] if args.control == "blank" else None
    out_path = args.out or os.path.splitext(args.ckpt)[0] + f"_preds{'_blank' if grey is not None else ''}.jsonl"
    n = exact = contains = 0
    skipped = []
    explained, on_target, cls_shares = 0, [], []  # --explain: answers explained, evidence on target, CLS shares
    if args.explain:
        os.makedirs(args.explain, exist_ok=True)

    def skip(fout, problem):  # skip mode: the record is in the predictions file with what is wrong, unscored
        skipped.append(problem)
        fout.write(json.dumps({"id": problem.id, "line": problem.line, "kind": problem.kind,
                               "error": problem.message()}, ensure_ascii=False) + "\n")

    with open(out_path, "w", encoding="utf-8") as fout:
        for p in problems:
            skip(fout, p)
        for start in tqdm(range(0, len(good), args.batch_size), desc="evaluating", unit="batch"):
            chunk, prompts, refs, n_images, pixels, keys, asked, coverages = [], [], [], [], [], [], [], []
            for e in good[start:start + args.batch_size]:
                messages = conversation_to_messages(e.record)
                paths = image_paths(e.record, args.images_dir)
                try:
                    ids = engine.prepare(messages[:-1], len(paths))
                    record_pixels = [] if grey is not None else [load_image(p, args.max_image_pixels) for p in paths]
                    record_coverage = record_coverages(e.record, paths, args.images_dir) if args.explain else None
                except PromptTooLong as err:
                    problem = Problem("too_long", args.data_path, e.line, e.id, f"the prompt is {err.n_tokens} tokens "
                                      f"(50 per image); the model reads at most {err.limit} before answering")
                except (BadImage, InputError) as err:  # InputError: a placeholder run typed in a record's text
                    problem = Problem(getattr(err, "kind", "image_count"), args.data_path, e.line, e.id, str(err))
                else:
                    problem = None
                if problem is not None:
                    if args.on_bad_sample == "error":
                        fout.flush()
                        raise DataError([problem], f"bad record (predictions so far are in {out_path}; fix it or "
                                                   "pass --on_bad_sample skip)") from None
                    skip(fout, problem)
                    continue
                chunk.append(e)
                asked.append((messages[:-1], paths))
                coverages.append(record_coverage)
                prompts.append(ids)
                refs.append(messages[-1]["content"].strip())
                n_images.append(len(paths))
                pixels += record_pixels
                keys += [image_cache_key(p) for p in paths] if cache is not None and grey is None else []
            feats = chunk_features(engine, n_images, pixels, keys or None, cache, grey)
            answers = engine.answer_batch(prompts, feats, seed=args.seed + start, **sampling(args, True)) if chunk else []
            for e, ref, ans, f, (messages, paths), coverage in zip(chunk, refs, answers, feats, asked, coverages):
                hit, has = ans == ref, ref.lower() in ans.lower()
                n, exact, contains = n + 1, exact + hit, contains + has
                record = {"id": e.record.get("id"), "image": e.record.get("image"), "reference": ref,
                          "prediction": ans, "exact": hit, "contains": has}
                if args.explain and f is not None and ans:
                    try:
                        record["relevance"] = explain_record(engine, args, e, messages, f, paths, ans, coverage,
                                                             png=explained < args.explain_pngs)
                    except InputError as err:  # e.g. the answer, tokenized again, no longer fits the context
                        record["relevance_error"] = str(err)
                    else:
                        explained += 1
                        cls_shares += [r["cls"] for r in record["relevance"]]
                        on_target += [r.get("target") for r in record["relevance"]]
                fout.write(json.dumps(record, ensure_ascii=False) + "\n")
    if cache is not None:
        cache.flush()  # the features encoded since the last full shard
    print(f"predictions: {out_path}", file=sys.stderr)
    if skipped:
        kinds = ", ".join(f"{k} {c}" for k, c in Counter(p.kind for p in skipped).items())
        print(f"skipped {len(skipped)} bad record(s) ({kinds}); each is in the predictions file with its error",
              file=sys.stderr)
    summary = {"n": n, "exact": round(exact / max(n, 1), 4), "contains": round(contains / max(n, 1), 4),
               "skipped": len(skipped)}
    if args.explain:
        summary["evidence"] = {"explained": explained, "cls": round(sum(cls_shares) / max(len(cls_shares), 1), 4),
                               **summarize_evidence(on_target)}
        print(f"where it looked: grids in {out_path}, PNGs of the first {min(explained, args.explain_pngs)} in "
              f"{args.explain}", file=sys.stderr)
    print(json.dumps(summary))


def explain_record(engine, args, entry, messages, feats, paths, answer, coverages, png) -> list:
    """--explain in batch mode: each image's relevance for the record's answer as JSON (with "target":
    {"evidence", "area"} where its object's mask is known), and its PNG when `png`."""
    images = [model_image(p, args.control, args.max_image_pixels) for p in paths] if png else None
    name = entry.record.get("id") or f"line_{entry.line}"
    _, relevances, on_target = save_explanation(engine, args, name, messages, feats, images, answer, coverages)
    out = []
    for relevance, coverage, found in zip(relevances, coverages or [None] * len(relevances), on_target):
        item = relevance.to_json()
        if coverage is not None:
            item["target"] = found
        out.append(item)
    return out


def chunk_features(engine, n_images, pixels, keys, cache, grey):
    """Each record's (n_i, 50, 768) features, or None without images: the grey image's under --control blank,
    else the chunk's images encoded in one batch (through the feature cache when given)."""
    if grey is not None:
        return [grey.expand(n, -1, -1) if n else None for n in n_images]
    feats = engine.image_features(torch.stack(pixels), keys, cache).split([n for n in n_images if n]) if pixels else []
    feats = iter(feats)
    return [next(feats) if n else None for n in n_images]


def image_features_of(engine, image):
    return engine.image_features(preprocess_image(image)[None])


def stream_answer(engine, args, messages, feats) -> str:
    """Print the answer as it is generated; return it."""
    print("🤖: ", end="", flush=True)
    answer = ""
    for piece in engine.generate(messages, feats, seed=args.seed, **sampling(args, False)):
        answer += piece
        print(piece, end="", flush=True)
    return answer


def run_gallery(args, engine):
    files = sorted(f for f in os.listdir(args.image_dir) if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise SystemExit(f"no images in {args.image_dir}")
    prompt = args.prompt if IMAGE_MARKER in args.prompt else f"{IMAGE_MARKER}\n{args.prompt}"
    for f in files:
        try:
            image = model_image(os.path.join(args.image_dir, f), args.control, args.max_image_pixels)
        except BadImage as e:
            print(f"[{f}] skipped: {e}\n")
            continue
        feats = image_features_of(engine, image)
        print(f"[{f}] {prompt.replace(IMAGE_MARKER, '').strip()}")
        messages = [{"role": "user", "content": prompt}]
        answer = stream_answer(engine, args, messages, feats)
        print()
        explain_answer(engine, args, os.path.splitext(f)[0], messages, feats, image, answer)
        print()


def explain_answer(engine, args, name, messages, feats, image, answer):
    """--explain in the chat modes: the answered image with its heatmap, as DIR/name.png (an empty answer has
    nothing to explain)."""
    if not args.explain or not answer.strip():
        return
    os.makedirs(args.explain, exist_ok=True)
    try:
        (path,), (relevance,), _ = save_explanation(engine, args, name, messages, feats, [image], answer)
    except InputError as e:  # e.g. the conversation and its answer outgrew the context
        print(f"[cannot say where it looked: {e}]")
        return
    print(f"[where it looked: {path}; {relevance.describe()}]")


def run_interactive(args, engine):
    image = args.image
    if image is None:
        files = sorted(f for f in os.listdir(args.image_dir) if f.lower().endswith(IMAGE_EXTS))
        image = os.path.join(args.image_dir, files[0]) if files else None
    print("Type a question. /image PATH switches image (new conversation), /clear forgets, /exit quits.")
    history, feats, shown, answered = [], None, None, 0
    while True:
        if feats is None and image:
            try:
                shown = model_image(image, args.control, args.max_image_pixels)
                feats = image_features_of(engine, shown)
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
        try:
            answer = stream_answer(engine, args, history, feats)
        except InputError as e:  # e.g. the conversation outgrew the context
            history.pop()
            print(f"cannot answer: {e}")
            continue
        print()
        if feats is not None:
            answered += 1
            name = f"{answered:03d}_{os.path.splitext(os.path.basename(image))[0]}"
            explain_answer(engine, args, name, history, feats, shown, answer)
        history.append({"role": "assistant", "content": answer})


def main(argv=None):
    args = parse_args(argv)
    try:
        chat(args)
    except (DataError, CheckpointError, BadImage, FileNotFoundError, InputError) as e:
        if isinstance(e, DataError) and len(e.problems) > DataError.SHOWN:  # the full list beside the predictions
            e.save_list(os.path.splitext(args.out or args.ckpt)[0] + "_bad_records.jsonl")
        raise SystemExit(f"error: {e}") from None


def chat(args):
    torch.manual_seed(args.seed)
    if args.ckpt is None:
        moe = "_moe" if args.use_moe else ""
        args.ckpt = f"out/{args.dim}{moe}_vlm_{'sft' if args.model_mode == 1 else 'pretrain'}"
    batch = dict(max_batch=args.batch_size) if args.data_path else {}  # batch mode: decode a whole batch together
    engine = ChatEngine.load(args.ckpt, args.vision_model, args.tokenizer, args.device, args.dtype,
                             max_seq_len=args.max_seq_len, **batch)
    args.ckpt = resolve_checkpoint(args.ckpt)
    print(f"MiniMind-V {args.ckpt}: {engine.model.num_parameters() / 1e6:.2f}M parameters "
          f"(dim {engine.cfg.dim}, {engine.cfg.n_layers} layers)", file=sys.stderr)
    if args.data_path:
        run_batch(args, engine)
    elif args.interactive:
        run_interactive(args, engine)
    else:
        run_gallery(args, engine)


if __name__ == "__main__":
    main()
