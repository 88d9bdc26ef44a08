"""``retouch ui``: a Gradio app over the same recipes as the command line.

The model loads once (:func:`build_app`); each tab is a function in :data:`TABS` that adds its
inputs, outputs and handler to the page -- a technique gets its tab by adding one function
there. Handlers run the library and return their results with a status line; an expected
error (the library's one-line message) goes into that status line, never a traceback, and the
app keeps serving. Long work shows tqdm progress in the page.

Needs the ``ui`` extra (``pip install retouch[ui]``: Gradio).
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..checks import EXPECTED_ERRORS, count, finite
from ..models.pipeline import PipelineModel
from ..toyworld.folder import shipped_name

__all__ = ["TABS", "build_app", "serve"]

GRAMMAR = "e.g. a big red circle on the left and a small blue square on the right"


def _guarded(fn: Callable, n_outputs: int) -> Callable:
    """``fn`` whose expected errors become ``(None, ..., "Error: message")``."""

    @functools.wraps(fn)  # Gradio reads the signature (its gr.Progress parameter)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EXPECTED_ERRORS as exc:
            return (*([None] * n_outputs), f"Error: {' '.join(str(exc).split())}")

    return run


def _checker_line(model: PipelineModel, prompt: str, image: np.ndarray) -> str:
    """The ToyWorld checker's reading of a generated image against its prompt."""
    if model.vocabulary is None:
        return ""
    from ..toyworld.checker import score
    from ..toyworld.scene import parse_caption

    try:
        expected = parse_caption(prompt)
    except ValueError:
        return " (the checker reads only ToyWorld captions)"
    marks = {k: v for k, v in score(image, expected).items() if v is not None}
    verdict = "all right" if marks.get("all") else "not all right"
    parts = ", ".join(f"{k} {'ok' if v else 'wrong'}" for k, v in marks.items() if k != "all")
    return f"; checker: {verdict} ({parts})"


def _generate_tab(gr, model: PipelineModel) -> None:
    from ..recipes.generate import generate, recommended_cfg
    from ..samplers import SAMPLERS

    with gr.Row():
        prompt = gr.Textbox(label="Prompt", placeholder=GRAMMAR, elem_id="generate-prompt")
    with gr.Row():
        steps = gr.Slider(1, 100, value=25, step=1, label="Steps", elem_id="generate-steps")
        cfg = gr.Number(value=recommended_cfg(model), label="CFG",
                        elem_id="generate-cfg")
        sampler = gr.Dropdown(list(SAMPLERS), value="ddim", label="Sampler")
        seed = gr.Number(value=0, precision=0, label="Seed")
    run = gr.Button("Generate", variant="primary", elem_id="generate-run")
    image = gr.Image(label="Image", elem_id="generate-image", type="numpy", height=256)
    status = gr.Textbox(label="Status", elem_id="generate-status", interactive=False)

    def handler(prompt, steps, cfg, sampler, seed, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        if not prompt.strip():
            raise ValueError("the prompt is empty: type what to generate")
        img = generate(model, prompt, steps=count("Steps", steps), cfg=finite("CFG", cfg),
                       seed=count("Seed", seed, minimum=0), sampler=sampler)[0]
        return img, f"generated {img.shape[1]}x{img.shape[0]}" + _checker_line(model, prompt,
                                                                              img)

    run.click(_guarded(handler, 1), [prompt, steps, cfg, sampler, seed], [image, status])


def _invert_tab(gr, model: PipelineModel) -> None:
    from ..images import prepare_image
    from ..inversion import METHODS, invert, reconstruct
    from ..metrics import psnr

    source = gr.Image(label="Image", type="pil", elem_id="invert-image")
    prompt = gr.Textbox(label="Caption of the image", elem_id="invert-prompt")
    with gr.Row():
        method = gr.Dropdown(list(METHODS), value="bdia", label="Method")
        steps = gr.Slider(1, 100, value=10, step=1, label="Steps")
        cfg = gr.Number(value=1.0, label="CFG")
    run = gr.Button("Invert and reconstruct", variant="primary", elem_id="invert-run")
    rec = gr.Image(label="Reconstruction", elem_id="invert-reconstruction", height=256)
    status = gr.Textbox(label="Status", elem_id="invert-status", interactive=False)

    def handler(image, prompt, method, steps, cfg, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        if image is None:
            raise ValueError("upload an image to invert first")
        image, _ = prepare_image(image, model.image_size)
        inv = invert(model, image, prompt, method=method, steps=count("Steps", steps),
                     cfg=finite("CFG", cfg))
        out = model.decode(reconstruct(inv, model))[0]
        return out, (f"{method}: PSNR {psnr(out, np.asarray(image)):.2f} dB, {inv.nfe} network "
                     "evaluations to invert")

    run.click(_guarded(handler, 1), [source, prompt, method, steps, cfg], [rec, status])


def _edit_tab(gr, model: PipelineModel) -> None:
    from ..images import prepare_image
    from ..inversion import METHODS
    from ..recipes.edit import EDITORS, edit
    from ..recipes.flowedit import flowedit

    source = gr.Image(label="Image", type="pil", elem_id="edit-image")
    with gr.Row():
        src = gr.Textbox(label="Source caption", elem_id="edit-source")
        tgt = gr.Textbox(label="Target caption", elem_id="edit-target")
    with gr.Row():
        inversion = gr.Dropdown(list(METHODS), value="direct", label="Inversion")
        editor = gr.Dropdown([*EDITORS, "flowedit"], value="p2p",
                             label="Editor (flowedit: no inversion)")
        steps = gr.Slider(2, 100, value=20, step=1, label="Steps")
        cfg = gr.Number(value=5.0, label="CFG")
    run = gr.Button("Edit", variant="primary", elem_id="edit-run")
    with gr.Row():
        rec = gr.Image(label="Source (reconstruction)", elem_id="edit-source-image", height=256)
        edited = gr.Image(label="Edit", elem_id="edit-edited", height=256)
        diff = gr.Image(label="Difference", elem_id="edit-difference", height=256)
    status = gr.Textbox(label="Status", elem_id="edit-status", interactive=False)

    def handler(image, source, target, inversion, editor, steps, cfg,
                progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        if image is None:
            raise ValueError("upload an image to edit first")
        image, _ = prepare_image(image, model.image_size)
        common = dict(steps=count("Steps", steps), cfg=finite("CFG", cfg))
        if editor == "flowedit":  # inverts nothing: the source is the image's VAE round trip
            result = flowedit(model, image, source, target, **common)
            how = "edited with FlowEdit (no inversion: the Inversion choice is not used)"
        else:
            result = edit(model, image, source, target, inversion=inversion, editor=editor,
                          **common)
            how = f"edited with {editor} after {inversion}"
        delta = np.abs(result.edited.astype(np.int16) - result.source.astype(np.int16))
        delta = (255 * delta / max(1, int(delta.max()))).astype(np.uint8)
        return result.source, result.edited, delta, how

    run.click(_guarded(handler, 3), [source, src, tgt, inversion, editor, steps, cfg],
              [rec, edited, diff, status])


def _guide_tab(gr, model: PipelineModel) -> None:
    from ..images import prepare_image
    from ..recipes.guide import SelfGuidance, guide

    source = gr.Image(label="Image", type="pil", elem_id="guide-image")
    with gr.Row():
        src = gr.Textbox(label="Caption of the image", elem_id="guide-source")
        tgt = gr.Textbox(label="Target caption (optional: names the new place or size)",
                         elem_id="guide-target")
    with gr.Row():
        word = gr.Textbox(label="Object word (occurs once)", elem_id="guide-word")
        dx = gr.Number(value=0.0, label="Move right (fraction of the width)", elem_id="guide-dx")
        dy = gr.Number(value=0.0, label="Move down (fraction of the height)", elem_id="guide-dy")
        scale = gr.Number(value=1.0, label="Resize by", elem_id="guide-scale")
        steps = gr.Slider(2, 100, value=25, step=1, label="Steps")
    run = gr.Button("Guide", variant="primary", elem_id="guide-run")
    with gr.Row():
        rec = gr.Image(label="Source (reconstruction)", elem_id="guide-source-image", height=256)
        edited = gr.Image(label="Guided", elem_id="guide-edited", height=256)
    status = gr.Textbox(label="Status", elem_id="guide-status", interactive=False)

    def handler(image, source, target, word, dx, dy, scale, steps,
                progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        if image is None:
            raise ValueError("upload an image to guide first")
        word = (word or "").strip()
        if not word:
            raise ValueError("name the object to move or resize (a word of the caption)")
        dx, dy, scale = finite("Move right", dx), finite("Move down", dy), finite("Resize by",
                                                                                   scale)
        move = {word: (dx, dy)} if dx or dy else {}
        resize = {word: scale} if scale != 1 else {}
        if not move and not resize:
            raise ValueError("nothing to do: set a move (right/down) or a resize other than 1")
        spec = SelfGuidance(move=move, resize=resize)
        image, _ = prepare_image(image, model.image_size)
        result = guide(model, image, source, spec, target_prompt=(target or None),
                       steps=count("Steps", steps))
        what = ", ".join([f"moved {word} by ({dx:+g}, {dy:+g})"] * bool(move)
                         + [f"resized {word} by {scale:g}"] * bool(resize))
        return result.source, result.edited, f"self-guidance: {what}"

    run.click(_guarded(handler, 2), [source, src, tgt, word, dx, dy, scale, steps],
              [rec, edited, status])


def _attention_tab(gr, model: PipelineModel) -> None:
    from ..recipes.attention_maps import attention_maps, save_attention_maps

    scratch = Path(tempfile.mkdtemp(prefix="retouch-ui-"))  # this tab's two output images
    prompt = gr.Textbox(label="Prompt", placeholder=GRAMMAR, elem_id="attention-prompt")
    image = gr.Image(label="Image (optional: read the model's attention on it)", type="pil")
    steps = gr.Slider(1, 50, value=10, step=1, label="Steps")
    run = gr.Button("Show attention", variant="primary", elem_id="attention-run")
    heat = gr.Image(label="Cross-attention per word", elem_id="attention-heatmaps")
    seg = gr.Image(label="Self-attention segments", elem_id="attention-segments")
    status = gr.Textbox(label="Status", elem_id="attention-status", interactive=False)

    def handler(prompt, image, steps, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        from ..images import prepare_image

        if image is not None:
            image, _ = prepare_image(image, model.image_size)
        maps = attention_maps(model, prompt, image=image, steps=count("Steps", steps))
        heat_path, seg_path = save_attention_maps(maps, scratch)  # one folder, overwritten
        words = ", ".join(f"{s}: {w}" for s, (w, _) in sorted(maps.segment_words.items()))
        return str(heat_path), str(seg_path), f"words: {', '.join(maps.heatmaps)}; segments "\
            f"{words}"

    run.click(_guarded(handler, 2), [prompt, image, steps], [heat, seg, status])


#: The tabs, in order: (title, builder(gr, model)). A new technique adds its tab here.
TABS: list[tuple[str, Callable]] = [
    ("Generate", _generate_tab),
    ("Invert", _invert_tab),
    ("Edit", _edit_tab),
    ("Guide", _guide_tab),
    ("Attention", _attention_tab),
]


def build_app(model: PipelineModel):
    """The Gradio Blocks app over ``model`` (loaded once, shared by every tab)."""
    try:
        import gradio as gr
    except ImportError as exc:
        raise ValueError("the web UI needs Gradio: pip install 'retouch[ui]'") from exc

    shipped = shipped_name(model.folder)
    name = f"the shipped ToyWorld model ({shipped})" if shipped else str(model.folder)
    with gr.Blocks(title="retouch") as app:
        gr.Markdown(f"# retouch\nDiffusion editing, inversion and attention on {name}.")
        for title, add in TABS:
            with gr.Tab(title, elem_id=f"tab-{title.lower()}"):
                add(gr, model)
    return app


def serve(model: str | None = None, *, port: int = 7860, host: str = "127.0.0.1",
          block: bool = True):
    """Load ``model`` once and serve the app on ``host:port``; returns the running app."""
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = build_app(PipelineModel.load(model))
    app.queue().launch(server_name=host, server_port=port, prevent_thread_lock=not block,
                       share=False, show_error=False, quiet=True)
    return app
