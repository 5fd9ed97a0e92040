"""A local web demo of MiniMind-V (Gradio): upload an image, chat about it, watch the answer stream.

  python web_server.py --ckpt out/512_vlm_sft                    # the real model, http://127.0.0.1:7788
  python web_server.py --ckpt out/demo/128_vlm_sft \\
      --vision_model model/clip_model/random-clip-vit-base-patch32-seed0   # after `make demo`

Each browser session keeps its own image and conversation; a new image starts a new conversation. The "Where did
it look?" toggle under the chat shows, for the last answer, the image with a 7x7 heatmap of the answer's evidence
(model/relevance.py), computed on the engine's thread once the answer is complete and only while it is on. Answers
of several visitors are decoded together, one forward pass per token for all of them (continuous batching,
up to --max_batch at once); later visitors wait in Gradio's queue, which shows them their place (up to
--max_waiting, then Gradio says the queue is full). Nothing is fetched from the
internet (no analytics, no web fonts).

A login (--auth USER:PASSWORD, repeatable, or --auth_file with one USER:PASSWORD a line) puts Gradio's login page
in front; a non-loopback --host or --share needs one (or --no_auth). SIGTERM or Ctrl-C: new questions are
refused, the answers in flight go on for up to --drain_seconds, and it exits 0.
"""
import argparse
import base64
import hashlib
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402

from model.LMConfig import IMAGE_MARKER  # noqa: E402
from model.cli import (HelpFormatter, add_serving_args, load_engine, read_secrets, require_auth,  # noqa: E402
                       serve_engine)
from model.engine import Busy, InputError, ShuttingDown, open_image  # noqa: E402
from model.relevance import draw_heatmap  # noqa: E402

EXAMPLE_IMAGES_DIR = "dataset/eval_images"
EXAMPLE_QUESTIONS = ["Describe this image.", "What colour is the shape?", "What shape is it?",
                     "请描述这张图片。", "图中形状是什么颜色？", "这是什么形状？"]
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
# A new (or removed) image starts a new conversation: the page empties the chat, the status line and the last
# answer's heatmap and its note at once.
CLEAR_ON_NEW_IMAGE = "() => [[], '', null, '']"
CSS = "#status p { color: #c62828; font-weight: 600; margin: 0; }"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_serving_args(p, default_port=7788)
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet and a "
                   "login)")
    p.add_argument("--auth", action="append", metavar="USER:PASSWORD", help="a login for the page (repeatable)")
    p.add_argument("--auth_file", help="a file of logins, one USER:PASSWORD a line")
    p.add_argument("--examples_dir", default=EXAMPLE_IMAGES_DIR, help="example images shown under the upload")
    return p.parse_args(argv)


def image_input(max_bytes, max_pixels, **kwargs):
    """A gr.Image whose upload is decoded by model.engine.open_image (size, pixel and format checks) instead of
    Gradio's own PIL call, so a bad file becomes a message in the page rather than an unexplained 'Error'.
    Its value in a handler is an RGB PIL image, with the SHA-1 of the file's bytes in .info["upload_key"] (which
    image a conversation is about), or the InputError that says what was wrong. (The instance's
    preprocess is replaced rather than subclassing: Gradio writes a .pyi file beside any component subclass.)"""
    image = gr.Image(type="pil", **kwargs)

    def preprocess(payload):
        if payload is None:
            return None
        name = Path(payload.orig_name or "the upload").name
        try:
            if payload.url and payload.url.startswith("data:"):  # pasted from the clipboard
                data = base64.b64decode(payload.url.split(",", 1)[1])
            else:  # a file Gradio saved in its upload cache (it refuses paths outside it)
                data = Path(payload.path).read_bytes()
            image = open_image(data, name, max_bytes, max_pixels)
        except InputError as e:
            return e
        image.info["upload_key"] = hashlib.sha1(data).hexdigest()
        return image
    image.preprocess = preprocess
    return image


def session_start(image=None, engine=None):
    """Per-browser-session state: which image the conversation is about, its features and the conversation as
    the model sees it."""
    if image is None:
        return {"image_key": None, "features": None, "history": []}
    return {"image_key": image.info["upload_key"], "features": engine.encode([image]), "history": []}


def chat_view(history):
    """What the chatbot shows: the conversation without the image marker."""
    return [{"role": m["role"], "content": m["content"].replace(IMAGE_MARKER, "").strip()} for m in history]


def last_answer(chat, state, image):
    """(conversation before it, answer) of the session's last answer about `image`, or None when the page shows
    none (no question yet, the chat cleared, or a new image not asked about yet)."""
    history = state["history"]
    if (not chat or not history or history[-1]["role"] != "assistant" or image is None
            or isinstance(image, InputError) or state["image_key"] != image.info["upload_key"]):
        return None
    return history[:-1], history[-1]["content"]


def evidence_view(engine, explain, chat, state, image):
    """(heatmap update, note) for the "Where did it look?" toggle: the last answer's image with its heatmap (the
    engine's thread computes the relevance; this handler thread only draws it), or nothing while the toggle is off
    or there is no answer."""
    if not explain:
        return gr.update(visible=False, value=None), ""
    asked = last_answer(chat, state, image)
    if asked is None:
        return gr.update(visible=True, value=None), "The heatmap of the next answer appears here."
    messages, answer = asked
    try:
        relevance = engine.explain(messages, state["features"], answer)[0]
        picture = draw_heatmap(image, relevance)
    except InputError as e:
        return gr.update(visible=True, value=None), f"⚠️ {e}"
    except Exception as e:  # show it, keep the page usable; the server log has what failed
        print(f"explaining failed: {e!r}", file=sys.stderr)
        return gr.update(visible=True, value=None), f"⚠️ The heatmap failed ({type(e).__name__}); see the server log."
    note = (f"Where the answer “{answer.strip()}” found its evidence: {relevance.describe()} "
            "(gradient x input on the image tokens; the redder and more opaque a patch, the more of it).")
    return gr.update(visible=True, value=picture), note


def build_app(engine, args):
    examples = []
    if os.path.isdir(args.examples_dir):
        examples = sorted(os.path.join(args.examples_dir, f) for f in os.listdir(args.examples_dir)
                          if f.lower().endswith(IMAGE_EXTS))

    def on_image(image):
        """A file that could not be read: say why (the page itself clears the chat and the status line as soon as
        the image changes, see CLEAR_ON_NEW_IMAGE). A valid image needs nothing here: the first question about it
        encodes it and starts the new conversation. This handler never updates the image component itself:
        Gradio answers any update of a component with a fresh instance of its class, which would bring back
        Gradio's own image decoding (and its bare 'Error') for the next upload."""
        if isinstance(image, InputError):  # the bad file stays in the component until replaced; Send refuses it
            return f"⚠️ {image}"
        return gr.skip()

    def on_question(question, image, chat, state, temperature, top_k, top_p, max_new_tokens):
        """Stream the answer into the chat. Yields (chatbot, state, textbox, status, send button, heatmap, its
        note); the button is disabled while an answer streams, and the last answer's heatmap goes (on_explain,
        chained after this, shows the new one's)."""
        def refuse(message):
            return gr.skip(), state, gr.skip(), f"⚠️ {message}", gr.skip(), gr.skip(), gr.skip()
        question = (question or "").strip()
        if isinstance(image, InputError):
            yield refuse(image)
            return
        if image is None:
            yield refuse("Upload an image first (or click one of the examples).")
            return
        if not question:
            yield refuse("Type a question first.")
            return
        if IMAGE_MARKER in question:
            yield refuse(f"'{IMAGE_MARKER}' is reserved for the image; leave it out.")
            return
        if state["image_key"] != image.info["upload_key"]:  # the first question about this image: encode it
            state = session_start(image, engine)
        elif not chat:  # the page's chat is empty (the same file uploaded again, or cleared): a new conversation
            state = dict(state, history=[])
        history = state["history"]
        content = question if history else f"{IMAGE_MARKER}\n{question}"  # the image goes in the first turn
        messages = history + [{"role": "user", "content": content}]
        try:
            generation = engine.generate(messages, state["features"], max_new_tokens=max_new_tokens,
                                         temperature=temperature, top_k=int(top_k), top_p=top_p)
        except (InputError, Busy, ShuttingDown) as e:
            yield refuse(e)
            return
        view = chat_view(messages) + [{"role": "assistant", "content": ""}]
        yield view, state, "", "", gr.update(interactive=False), gr.update(value=None), ""  # the old heatmap goes
        status = ""
        try:
            for piece in generation:
                view[-1]["content"] += piece
                yield view, state, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        except Exception as e:  # show it, keep the page usable; the server log has the traceback
            print(f"generation failed: {e!r}", file=sys.stderr)
            status = f"⚠️ The model failed while answering ({type(e).__name__}); see the server log."
        finally:  # also when Gradio drops this handler (the visitor left): the answer's slot frees at once
            generation.cancel()
        state["history"] = messages + [{"role": "assistant", "content": view[-1]["content"]}]
        yield view, state, gr.skip(), status, gr.update(interactive=True), gr.skip(), gr.skip()

    def on_explain(explain, chat, state, image):
        """The toggle switched, or an answer finished: the last answer's heatmap while the toggle is on (read now,
        so a switch during an answer counts), else none."""
        return evidence_view(engine, explain, chat, state, image)

    def on_clear(state):
        """Forget the conversation, keep the image."""
        return [], dict(state, history=[]), "", "", None, ""

    theme = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                           font_mono=["ui-monospace", "monospace"])  # system fonts: no Google Fonts request
    with gr.Blocks(title="MiniMind-V", analytics_enabled=False) as app:
        gr.Markdown(f"## MiniMind-V\n{engine.describe()}", elem_id="header")
        state = gr.State(session_start())
        with gr.Row():
            with gr.Column(scale=2):
                image = image_input(args.max_image_bytes, args.max_image_pixels, label="Image",
                                    sources=["upload", "clipboard"], height=320, elem_id="image")
                if examples:
                    gr.Examples(examples=[[p] for p in examples], inputs=[image], label="Example images",
                                examples_per_page=12)
                with gr.Accordion("Sampling", open=False):
                    temperature = gr.Slider(0, 1.5, value=0.65, step=0.05, label="temperature (0: greedy)")
                    top_k = gr.Slider(0, 200, value=0, step=1, label="top-k (0: off)")
                    top_p = gr.Slider(0.05, 1.0, value=0.85, step=0.05, label="top-p")
                    max_new = gr.Slider(1, engine.context, step=1, label="max new tokens",
                                        value=min(256, engine.context))
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", height=540, elem_id="chat", buttons=["copy"])
                status = gr.Markdown("", elem_id="status")
                with gr.Row():
                    question = gr.Textbox(placeholder="Ask about the image (Enter to send)", show_label=False,
                                          scale=5, elem_id="question")
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                gr.Examples(examples=[[q] for q in EXAMPLE_QUESTIONS], inputs=[question],
                            label="Example questions")
                with gr.Row():
                    explain = gr.Checkbox(False, label="Where did it look?", elem_id="explain", scale=1,
                                          info="the last answer's evidence, patch by patch, over the image")
                    clear = gr.Button("Clear conversation", elem_id="clear", scale=1)
                heatmap = gr.Image(label="Where did it look?", show_label=False, type="pil", format="png",
                                   interactive=False, visible=False, elem_id="heatmap", buttons=["download"])
                heatmap_note = gr.Markdown("", elem_id="heatmap_note")

        # Done in the page, not on the server: a server-side clear could arrive after a question asked right after
        # the upload, and wipe its answer.
        image.change(fn=None, js=CLEAR_ON_NEW_IMAGE, outputs=[chatbot, status, heatmap, heatmap_note])
        image.change(on_image, [image], [status])
        ask = dict(fn=on_question, inputs=[question, image, chatbot, state, temperature, top_k, top_p, max_new],
                   outputs=[chatbot, state, question, status, send, heatmap, heatmap_note],
                   concurrency_limit=args.max_batch, concurrency_id="generate")
        show = dict(fn=on_explain, inputs=[explain, chatbot, state, image], outputs=[heatmap, heatmap_note],
                    concurrency_limit=args.max_batch, concurrency_id="generate")
        send.click(**ask).then(**show)
        question.submit(**ask).then(**show)
        explain.change(**show)
        cleared = [chatbot, state, question, status, heatmap, heatmap_note]
        clear.click(on_clear, [state], cleared)
        chatbot.clear(on_clear, [state], cleared)  # the chat's own trash icon
    return app, theme


def logins(args) -> list:
    """[(user, password)] from --auth and --auth_file; exits naming a malformed entry."""
    pairs = []
    for entry in read_secrets(args.auth, args.auth_file, what="login"):
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise SystemExit("error: a login must be USER:PASSWORD, both non-empty (got an entry without "
                             f"{'a colon' if not sep else 'a user' if not user else 'a password'})")
        pairs.append((user, password))
    return pairs


def main(argv=None):
    args = parse_args(argv)
    auth = logins(args)
    require_auth(args, bool(auth), "--auth USER:PASSWORD (or --auth_file)",
                 "--share opens a public link" if args.share else None)
    engine = load_engine(args)
    print(f"MiniMind-V: {engine.describe()}", file=sys.stderr)
    app, theme = build_app(engine, args)
    app.queue(max_size=args.max_waiting, default_concurrency_limit=args.max_batch)
    app.launch(server_name=args.host, server_port=args.port, share=args.share, ssr_mode=False,
               max_file_size=args.max_image_bytes, theme=theme, css=CSS, footer_links=["gradio"],
               show_error=False, quiet=False, prevent_thread_lock=True, auth=auth or None,
               auth_message="MiniMind-V: log in to chat with the model")
    # the answers are computed on this, the main, thread; on SIGTERM the engine refuses new questions (drain)
    serve_engine(engine, lambda: None, app.close, args.drain_seconds, status_interval=args.status_interval)


if __name__ == "__main__":
    main()
