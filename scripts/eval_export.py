"""Held-out accuracy of a stock LLaVA export (export_model.py) through transformers' own image-text-to-text
pipeline, next to the repository's engine on the same checkpoint: greedy fp32 answers, which must be equal.

  python scripts/eval_export.py --export export/demo-llava --ckpt out/demo/128_vlm_sft \\
      --vision_model model/clip_model/random-clip-vit-base-patch32-seed0 --images_dir dataset/demo/images \\
      --data_path dataset/demo/eval_color.jsonl dataset/demo/eval_shape.jsonl

For each LLaVA-format file (the last answer of a record is its reference) it prints one JSON line: n, the exact
and contains scores of both (as 3-eval_chat.py counts them) and `agree`, the share of records the two answer
alike; then a markdown table. The pipeline is loaded with trust_remote_code=False.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from model.cli import HelpFormatter, add_model_args  # noqa: E402
from model.LMConfig import IMAGE_MARKER  # noqa: E402
from model.images import read_image  # noqa: E402
from trainer.records import check_records, conversation_to_messages, image_paths, read_records  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p, ckpt_default=None, ckpt_help="what the engine loads (None: the export directory itself, "
                   "converted back)", runtime=False)
    a = p.add_argument
    a("--export", required=True, help="a directory export_model.py wrote with --format llava")
    a("--data_path", nargs="+", required=True, help="LLaVA-format JSONL file(s) whose last answer is the reference")
    a("--images_dir", default=".", help="directory the records' image paths are relative to")
    a("--max_new_tokens", type=int, default=8, help="longest answer, in tokens")
    a("--batch_size", type=int, default=16, help="prompts the engine answers together (its answers do not depend on it)")
    a("--pipeline_batch_size", type=int, default=1, help="chats the pipeline answers together (left-padded: fp32 "
      "rounding may then differ a little from a chat alone)")
    a("--limit", type=int, default=0, help="only the first N records of each file (0: all)")
    a("--device", default="cpu", help="where both run (fp32)")
    return p.parse_args(argv)


def pipeline_chat(messages, images):
    """The messages in transformers' chat form: content as parts, each `<image>` an image part holding the next
    image. The export's chat template writes an image part as `<image>\\n`, so the newline after a marker is
    left to it."""
    images, chat = iter(images), []
    for m in messages:
        pieces = m["content"].split(IMAGE_MARKER)
        parts = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
        for text in pieces[1:]:
            parts.append({"type": "image", "image": next(images)})
            text = text[1:] if text.startswith("\n") else text
            if text:
                parts.append({"type": "text", "text": text})
        chat.append({"role": m["role"], "content": parts})
    return chat


def evaluate(args, path, pipe, engine):
    entries, problems = read_records(path)
    entries = entries[:args.limit] if args.limit else entries
    good, found = check_records(entries, path, args.images_dir)
    if problems or found:
        raise SystemExit(f"error: {len(problems + found)} bad record(s) in {path}, e.g. {(problems + found)[0]}")
    refs, theirs, ours = [], [], []
    for start in range(0, len(good), args.batch_size):
        chats, prompts, feats = [], [], []
        for e in good[start:start + args.batch_size]:
            messages = conversation_to_messages(e.record)
            images = [read_image(p) for p in image_paths(e.record, args.images_dir)]
            refs.append(messages[-1]["content"].strip())
            chats.append(pipeline_chat(messages[:-1], images))
            prompts.append(engine.prepare(messages[:-1], len(images)))
            feats.append(engine.encode(images) if images else None)
        # do_sample goes in generate_kwargs: beside max_new_tokens the pipeline would hand it to the processor
        replies = pipe(text=chats, max_new_tokens=args.max_new_tokens, generate_kwargs={"do_sample": False},
                       batch_size=args.pipeline_batch_size)
        theirs += [r[0]["generated_text"][-1]["content"].strip() if isinstance(r, list) else
                   r["generated_text"][-1]["content"].strip() for r in replies]
        ours += engine.answer_batch(prompts, feats, max_new_tokens=args.max_new_tokens, temperature=0)
    n = max(len(refs), 1)

    def score(answers):
        return {"exact": round(sum(a == r for a, r in zip(answers, refs)) / n, 4),
                "contains": round(sum(r.lower() in a.lower() for a, r in zip(answers, refs)) / n, 4)}
    return {"file": str(path), "n": len(refs), "pipeline": score(theirs), "engine": score(ours),
            "agree": round(sum(a == b for a, b in zip(theirs, ours)) / n, 4)}


def main(argv=None):
    args = parse_args(argv)
    from transformers import pipeline
    from model.engine import ChatEngine
    pipe = pipeline("image-text-to-text", model=args.export, dtype=torch.float32, device=args.device,
                    trust_remote_code=False)
    engine = ChatEngine.load(args.ckpt or args.export, args.vision_model, args.tokenizer, args.device, "float32")
    results = [evaluate(args, path, pipe, engine) for path in args.data_path]
    for r in results:
        print(json.dumps(r))
    print(f"\n| held-out file | n | pipeline (transformers, {os.path.basename(os.path.normpath(args.export))}) "
          f"| engine ({engine.name}) | same answer |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {os.path.basename(r['file'])} | {r['n']} | {r['pipeline']['exact']:.1%} | "
              f"{r['engine']['exact']:.1%} | {r['agree']:.1%} |")
    return results


if __name__ == "__main__":
    main()
