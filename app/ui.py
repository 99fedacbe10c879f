"""Layout and event wiring only; the work is in ``app.handlers`` (unit-tested without a browser)."""
from __future__ import annotations

import functools
import inspect
import logging
import os

import gradio as gr
from gradio.data_classes import ListFiles
from gradio.route_utils import FnIndexInferError
from starlette.responses import PlainTextResponse

from core.bundles.bundle import truth_column
from core.errors import MinorityError

from . import handlers as h

log = logging.getLogger("minority-studio")

QUEUE_SIZE = 8  # pending requests beyond this get a clean "queue full" error
MAX_FILE_SIZE = "20mb"  # the one upload input ("Score an image"); larger uploads are refused with 413
# Gradio's delete_cache (frequency, age) in seconds: every 10 minutes, files this app put in Gradio's cache
# more than an hour ago are deleted (uploads never scored, download zips, gallery images), and all of them when
# the server stops. A scored upload is deleted at once (app.verdicts.read_upload); this bounds the ones sent to
# /gradio_api/upload and never scored. An hour keeps a visitor's grids and download link alive for a session.
DELETE_CACHE = (600, 3600)

# "l2" in a code font reads as "12": the header names the distance in words
DISTANCE_NAMES = {"l2": "L2 (mean squared error)", "l1": "L1 (mean absolute error)", "ssim": "1 − SSIM",
                  "lpips": "LPIPS (VGG)", "lpips-alex": "LPIPS (AlexNet)", "lpips-rand": "LPIPS with a random VGG",
                  "unet-feat": "LPIPS-style distance in the model's own UNet features"}

INTRO = """# Minority guidance studio
Steer a diffusion model toward **rare** samples (Um, Lee & Ye, ICLR 2024). Pick the target rarity class
**l** (0 = most common, L-1 = rarest) and the classifier scale **w**: releasing a slider starts a new grid
and stops the one still running (**Generate** runs the other settings). The left grid is guided; the right
grid is the standard sampler from the same seed."""


def gpu(fn):
    """Hugging Face ZeroGPU's convention: when the ``spaces`` package is importable (a Space), the GPU work
    (generate, score an image) is wrapped in ``@spaces.GPU``, which attaches a GPU for the call; elsewhere ``fn``
    itself, unchanged."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


# Run in the browser before a run's request is sent: its last input becomes the browser's clock (ms), which
# orders a visitor's runs as they were asked for, whatever order their requests arrive in (app.live).
STAMP_JS = "(...inputs) => [...inputs.slice(0, -1), performance.timeOrigin + performance.now()]"


def _per_visitor(fn):
    """fn(*inputs, visitor=the Gradio session's hash): Gradio hands its request to a parameter typed gr.Request.
    With the clock STAMP_JS puts last in the inputs, the visitor's newest run stops the older ones (app.live)."""
    def with_visitor(request: gr.Request, *inputs):
        yield from fn(*inputs, visitor=getattr(request, "session_hash", None))
    return with_visitor


def _readable(fn):
    """Turn project errors into a gr.Error the user reads; other errors become one line, never a traceback."""
    def convert(e):
        if isinstance(e, gr.Error):
            return e
        if isinstance(e, MinorityError):
            return gr.Error(str(e))
        name = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", repr(fn))  # partials
        log.error("unexpected error in %s", name, exc_info=e)  # details stay in the server log
        return gr.Error(f"Unexpected error ({type(e).__name__}); the details are in the server log.")

    def skip_unchanged(out):
        if isinstance(out, tuple):
            return tuple(gr.skip() if v is h.UNCHANGED else v for v in out)
        return gr.skip() if out is h.UNCHANGED else out

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*a, **kw):
            try:
                for out in fn(*a, **kw):
                    yield skip_unchanged(out)
            except Exception as e:  # noqa: BLE001
                raise convert(e) from None
        return gen

    @functools.wraps(fn)
    def plain(*a):
        try:
            return skip_unchanged(fn(*a))
        except Exception as e:  # noqa: BLE001
            raise convert(e) from None
    return plain


OPTIONAL = "studio_optional_input"  # an input an API call may leave out (its value is then the component's)


class StudioBlocks(gr.Blocks):
    """gr.Blocks whose wrong-number-of-inputs answer is one readable line naming the expected inputs (Gradio's
    own message lists Python object addresses, and Gradio ignores extra values silently).

    Extra values: an API call may send the values without the gr.State slots (Gradio fills them in) or with
    them (the browser's format), so a call with exactly len(inputs) values, one more than the API lists for
    /generate, cannot be told from the browser's and is accepted (the State slot's value is never read: the
    visitor's state comes from the session). More values than that are refused. Events that cancel others
    (Stop) receive the session hash as their one value and are left alone. An input marked OPTIONAL (the
    browser's clock, last among /generate's) may be left out: it then gets its component's value (0, no clock),
    so API calls written before it existed still work."""

    def validate_inputs(self, block_fn, inputs):
        optional = [b for b in block_fn.inputs if getattr(b, OPTIONAL, False)]  # the browser's clock
        sent = [b for b in block_fn.inputs if not getattr(b, OPTIONAL, False)]
        if optional and len(inputs) in (len(sent), len([b for b in sent if not isinstance(b, gr.State)])):
            values = iter(inputs)  # without the optional inputs, with or without the State slots
            with_slots = len(inputs) == len(sent)
            inputs[:] = [b.value if getattr(b, OPTIONAL, False) else None if isinstance(b, gr.State)
                         and not with_slots else next(values) for b in block_fn.inputs]  # Gradio reads this list on
        wanted = [b for b in block_fn.inputs if not isinstance(b, gr.State) and not getattr(b, OPTIONAL, False)]
        too_many = len(inputs) > len(block_fn.inputs) and not block_fn.cancels and block_fn.fn is not None
        if len(inputs) < len(block_fn.inputs) or too_many:
            names = ", ".join(str(getattr(b, "label", None) or type(b).__name__) for b in wanted)
            api = f"/{block_fn.api_name}" if getattr(block_fn, "api_name", None) else "this event"
            got = len(inputs) if too_many else min(len(inputs), len(wanted))
            extra = "".join(f" and optionally {b.label}" for b in optional)
            raise gr.Error(f"{api} needs {len(wanted)} values ({names}){extra}; got {got}")
        return super().validate_inputs(block_fn, inputs)


def _path_only(upload: gr.File) -> gr.File:
    """``upload`` (a single-file gr.File of type "filepath") handing its handler the upload's path and nothing
    else. Gradio 6.31's File._process_single_file also opens a NamedTemporaryFile(delete=False) in the cache
    on every call and never writes, closes or deletes it: one empty tmpXXXXXXXX file left per scored upload.
    An instance attribute, not a subclass: Gradio writes a .pyi stub beside the module of every Component
    subclass at import time (component_meta.create_or_modify_pyi)."""
    def preprocess(payload):
        if payload is None:
            return None
        return str((payload[0] if isinstance(payload, ListFiles) else payload).path)

    if upload.type != "filepath" or upload.file_count != "single" or upload.file_types:
        raise ValueError("_path_only takes a single-file gr.File of type 'filepath' without file_types")
    upload.preprocess = preprocess
    return upload


def claims_upload(demo: gr.Blocks, path: str) -> bool:
    """Whether ``path`` is a file Gradio's upload route (/gradio_api/upload) wrote for this app, claimed once.

    The rule for /score_image: read and delete a file only if it arrived through the upload route. Gradio
    records every path that route writes in ``Blocks.upload_file_set``; files the app itself put in the
    cache (download zips, gallery images, previews) are never in it, so naming one, even with its hashed
    path, is refused and the file survives. A claimed path leaves the set (a replay is refused too; the file
    is deleted after reading anyway). Gradio's /upload and /call are separate requests with no session tie,
    so "this visitor's upload" cannot be checked further; an upload's path holds the sha256 of its content
    with the server's secret hash seed, so another visitor's upload path cannot be guessed."""
    uploads = demo.upload_file_set
    key = os.path.abspath(path)
    for p in (path, key):
        if p in uploads:
            uploads.discard(p)
            return True
    for p in list(uploads):  # the set as Gradio stored it may be spelled differently (a relative GRADIO_TEMP_DIR)
        if os.path.abspath(p) == key:
            uploads.discard(p)
            return True
    return False


def _method_controls(method: str) -> tuple:
    """Show the chosen method's own controls. Boost-and-Skip and self-guidance switch to the ancestral
    sampler: its fresh noise contracts Boost-and-Skip's boosted variance, and the official self-guided
    sampler is ancestral (with DDIM, ADM's unclipped eps shift of the max-normalised self-guidance gradient
    breaks the images; both measured in docs/RESULTS.md)."""
    ancestral = method in ("Boost-and-Skip", "self-guided")
    return (gr.update(visible=method == "Boost-and-Skip"), gr.update(visible=method == "self-guided"),
            gr.update(value="ancestral (DDPM)") if ancestral else gr.update())


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_") or "bundle"


def build_ui(studios, delete_cache: tuple = DELETE_CACHE) -> gr.Blocks:
    """The Blocks app over a Library of bundles (or one Studio): a bundle selector on top switches the whole
    page; each bundle's page is laid out from its manifest alone (no weights loaded). The first bundle keeps
    the plain API names (/generate, /density, /browse, /score_image); the others add _<name>.
    ``delete_cache``: Gradio's (frequency, age) in seconds for its cache (DELETE_CACHE; tests shorten it)."""
    from .library import Library

    lib = studios if isinstance(studios, Library) else Library([studios])
    names = lib.names()
    with StudioBlocks(title="Minority guidance studio", delete_cache=delete_cache) as demo:
        gr.Markdown(INTRO)
        selector = gr.Radio(names, value=names[0], label="Bundle", elem_id="bundle-select", visible=len(names) > 1,
                            info="each bundle is its own data set, model and classifier")
        if lib.skipped:
            gr.Markdown("\n".join(f"⚠ Bundle `{p}` was skipped: {why}" for p, why in lib.skipped), elem_id="skipped")
        pages, loaders = [], []
        for i, studio in enumerate(lib.studios):
            sfx = "" if i == 0 else "_" + _slug(studio.name)
            with gr.Column(visible=i == 0) as col:
                loaders.append(_page(demo, studio, sfx, first=i == 0))
            pages.append(col)

        def show(name):
            return tuple(gr.update(visible=n == name) for n in names)

        selector.change(show, selector, pages, queue=False, api_visibility="private")
        for name, (fns, inputs, outputs) in zip(names, loaders):
            def load_if(selected, *values, _name=name, _fns=fns, _inputs=inputs, _outputs=outputs):
                if selected != _name:
                    return tuple(gr.skip() for outs in _outputs for _ in outs)
                out, k = [], 0
                for fn, ins, outs in zip(_fns, _inputs, _outputs):
                    r = fn(*values[k:k + len(ins)])
                    k += len(ins)
                    out.extend(r if isinstance(r, tuple) else (r,))
                return tuple(out)
            flat_in = [c for ins in inputs for c in ins]
            flat_out = [c for outs in outputs for c in outs]
            selector.change(load_if, [selector, *flat_in], flat_out, api_visibility="private")
    return demo


def _page(demo: gr.Blocks, studio: h.Studio, sfx: str, first: bool) -> tuple:
    """One bundle's tabs; returns (handlers, inputs, outputs) of what its page shows on load."""
    from . import sweep as sw
    from . import verdicts as v

    manifest = studio.manifest_cached()
    L = int(manifest["num_classes"])
    d = h.DEFAULTS
    eid = (lambda name: name) if not sfx else (lambda name: f"{name}{sfx.replace('_', '-')}")
    api = lambda name: name + sfx  # noqa: E731
    truth = truth_column(manifest)
    channels = int(manifest.get("channels", 1))
    cols = _columns(studio)  # real.csv's header, read once for the Browse order and filter hint
    sc = manifest["score"]
    gr.Markdown(f"Bundle: `{manifest.get('name', studio.path.name)}` · {L} classes · "
                f"{manifest['image_size']}x{manifest['image_size']} {'RGB' if channels == 3 else 'grey'} · "
                f"minority score: {DISTANCE_NAMES.get(sc['distance'], sc['distance'])} at t = {sc['t']}, "
                f"{sc['draws']} noise draws" + (f" · ground truth: `{truth}`" if truth else ""))
    visit = gr.State(None)
    with gr.Tab("Generate"):
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                l_slider = gr.Slider(0, L - 1, value=L - 1, step=1, label="Minority class l",
                                     info=f"0 = most common … {L - 1} = rarest", elem_id=eid("minority-class"))
                l_words = gr.Markdown(h.rarity_label(L - 1, L), elem_id=eid("class-panel"))
                l_examples = gr.Image(label="Real examples of class l", show_label=False, height=90,
                                      interactive=False, elem_id=eid("class-examples"))
                spread = gr.Slider(*h.LIMITS["spread"], value=d["spread"], step=1, label="Range below l",
                                   info="each image's class drawn uniformly from l − r … l (0 = all at l; "
                                        "the paper samples l ~ U{90..99})", elem_id=eid("spread"))
                w_slider = gr.Slider(*h.LIMITS["scale"], value=d["scale"], step=0.1, label="Guidance scale w",
                                     info="classifier scale (minority guidance) or self-guided scale; "
                                          "0 = standard sampler", elem_id=eid("scale"))
                method = gr.Radio(list(h.METHODS), value=d["method"], label="Method", elem_id=eid("method"),
                                  info="self-guided and Boost-and-Skip need no classifier (l is unused)")
                with gr.Group(visible=False) as boost_box:
                    gamma = gr.Slider(*h.LIMITS["gamma"], value=d["gamma"], step=0.1, label="Boost gamma",
                                      info="initial noise scale (1 = standard)")
                    skip = gr.Slider(*h.LIMITS["skip"], value=d["skip"], step=1, label="Skip Δt",
                                     info="sampler steps skipped at the noisy end")
                with gr.Group(visible=False) as self_box:
                    interval = gr.Slider(*h.LIMITS["interval"], value=d["interval"], step=1,
                                         label="Self-guidance interval k",
                                         info="guide the steps whose index (counting down to 0) is a multiple "
                                              "of k, as the official sampler does")
                start, start_steps = h.app_defaults(manifest)
                sampler = gr.Dropdown(list(h.SAMPLERS), value=start, label="Sampler", elem_id=eid("sampler"),
                                      info="the bundle's recommended sampler is selected" if start != d["sampler"]
                                      else "DDIM and ancestral are ADM-exact; the others are diffusers' schedulers")
                steps = gr.Slider(*h.LIMITS["steps"], value=start_steps, step=1, label="Steps", elem_id=eid("steps"))
                n = gr.Slider(*h.LIMITS["n"], value=d["n"], step=1, label="Number of images", elem_id=eid("n"))
                # precision=None: Gradio's precision=0 rounds 1.5 to 2 before the handler sees it (an API call's
                # seed 1.5 ran as seed 2); GenerateRequest.check refuses a fraction by name instead
                seed = gr.Number(d["seed"], precision=None, step=1, label="Seed", minimum=0,
                                 maximum=h.LIMITS["seed"][1], elem_id=eid("seed"))
                with gr.Row():
                    run_btn = gr.Button("Generate", variant="primary", elem_id=eid("generate"))
                    stop_btn = gr.Button("Stop", variant="stop", elem_id=eid("stop"))
                download = gr.DownloadButton("Download PNGs + CSV", value=None, elem_id=eid("download"))
            with gr.Column(scale=3):
                status = gr.Markdown("Press **Generate**.", elem_id=eid("status"))
                gr.Markdown("Captions: each image's minority score (Eq. 7, the bundle's distance and timestep, "
                            f"{h.caption_draws(manifest['score'])} noise draws; higher = more unique)"
                            + (", then its estimated atrophy (0 … 1)" if truth == "severity" else "")
                            + ". While sampling runs, the grids preview the current denoised estimate "
                            "(Tweedie x0_hat). Click a finished image to see its nearest real images.")
                with gr.Row():
                    guided = gr.Gallery(label="Chosen method", columns=4, height=560, object_fit="contain",
                                        elem_id=eid("guided"), allow_preview=False)
                    standard = gr.Gallery(label="Standard sampler, same seed", columns=4, height=560,
                                          object_fit="contain", elem_id=eid("standard"), allow_preview=False)
                nb_strip = gr.Image(label="Selected image and its nearest real images", height=110,
                                    interactive=False, elem_id=eid("neighbours"))
                nb_text = gr.Markdown(elem_id=eid("neighbours-text"))
                nb_why = gr.Image(label="Why is it rare? x0 · x_t · x0_hat · rarity map", height=150,
                                  interactive=False, elem_id=eid("why"))
                nb_why_text = gr.Markdown(elem_id=eid("why-text"))
                with gr.Accordion("Sweep one seed across levels (the paper's Figures 15, 16)", open=False,
                                  elem_id=eid("sweep-box")):
                    with gr.Row():
                        sweep_kind = gr.Radio(list(sw.SWEEP_KINDS), value=sw.SWEEP_KINDS[0], show_label=False,
                                              elem_id=eid("sweep-kind"))
                        sweep_btn = gr.Button("Sweep", elem_id=eid("sweep"))
                    sweep_text = gr.Markdown(elem_id=eid("sweep-text"))
                    sweep_grid = gr.Gallery(show_label=False, columns=5, height=200, object_fit="contain",
                                            elem_id=eid("sweep-grid"), allow_preview=False)
    with gr.Tab("Score an image", elem_id=eid("score-tab")):
        gr.Markdown("Upload a PNG or JPEG, or a NIfTI volume (.nii / .nii.gz; then choose the axial slice), at most "
                    "20 MB. It is converted, cropped and resized as the bundle's data were, scored with the bundle's "
                    "settings, placed among the real data, and deleted from the server right after reading.")
        up_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                upload = _path_only(gr.File(label="PNG, JPEG or NIfTI, at most 20 MB", file_count="single",
                                            type="filepath", elem_id=eid("upload")))
                z_slider = gr.Slider(0, 1, value=0, step=1, visible=False, label="Axial slice z", elem_id=eid("slice"))
                seen = gr.Image(label="As the model sees it", height=200, interactive=False, elem_id=eid("seen"))
            with gr.Column(scale=2):
                verdict_md = gr.Markdown(elem_id=eid("verdict"))
                verdict_nb = gr.Image(label="Nearest real images", height=110, interactive=False,
                                      elem_id=eid("verdict-neighbours"))
                verdict_why = gr.Image(label="Why is it rare? x0 · x_t · x0_hat · rarity map", height=150,
                                       interactive=False, elem_id=eid("verdict-why"))
                verdict_why_text = gr.Markdown(elem_id=eid("verdict-why-text"))
                verdict_map = gr.Plot(label="Where it lies on the 2-D map")
    with gr.Tab("Density", elem_id=eid("density-tab")) as density_tab:
        gr.Markdown("AvgkNN and LOF of the real data, and of every sample you generated in this visit "
                    "(higher = rarer), as in Figure 3 of the paper; updated after each run.")
        density_plot = gr.Plot(label="Density")
    with gr.Tab("Browse real data", elem_id=eid("browse-tab")) as browse_tab:
        with gr.Row():
            order = gr.Dropdown(h.browse_orders(cols), value="most unique first", label="Order",
                                elem_id=eid("order"))
            class_filter = gr.Dropdown(h.class_choices(L), value="all", label="Class")
            where = gr.Textbox("", label="Filter", placeholder=_filter_hint(cols), elem_id=eid("where"),
                               info="conditions on the real data's columns, e.g. " + _filter_hint(cols))
            page = gr.Number(1, precision=0, minimum=1, label="Page")
        with gr.Row():
            prev_btn = gr.Button("◀ Previous")
            next_btn = gr.Button("Next ▶")
        page_info = gr.Markdown()
        browse = gr.Gallery(label="Real images (click one: why is it rare?)", columns=6, height=520,
                            object_fit="contain", elem_id=eid("browse"), allow_preview=False)
        browse_why = gr.Image(label="Why is it rare? x0 · x_t · x0_hat · rarity map", height=150, interactive=False,
                              elem_id=eid("browse-why"))
        browse_why_text = gr.Markdown(elem_id=eid("browse-why-text"))
        map_plot = gr.Plot(label="2-D map of the real data")

    # ---- wiring -----------------------------------------------------------------------------
    class_fn = _readable(functools.partial(h.on_class, studio))
    l_slider.change(class_fn, l_slider, [l_words, l_examples], api_visibility="private")
    method.change(_method_controls, method, [boost_box, self_box, sampler], queue=False, api_visibility="private")
    # the browser's clock at each click or release (STAMP_JS); the API's optional last input, 0 = no clock
    issued = gr.Number(0, visible=False, label="the browser's clock (ms; 0: none)")
    setattr(issued, OPTIONAL, True)
    gen_inputs = [l_slider, w_slider, steps, n, seed, sampler, method, gamma, skip, interval, spread, visit, issued]
    gen_outputs = [guided, standard, status, download, visit]
    generate_fn = gpu(_per_visitor(_readable(functools.partial(h.on_generate, studio))))
    gen = run_btn.click(generate_fn, gen_inputs, gen_outputs, js=STAMP_JS,
                        api_name=api("generate"), trigger_mode="always_last", concurrency_limit=1,
                        concurrency_id="sampling", show_progress="hidden")
    # Live sliders (issue 26.3): releasing l, w or the range (its number box's blur counts too: Gradio's slider
    # sends release then) runs Generate's handler. The newest run of the visitor stops the older ones at their
    # next step and every run waits for the sampling lock (app.live); so this event has no concurrency limit and
    # no Gradio cancels, which both hung in session 11's try. The Generate button keeps the queue's limit of 1.
    live = gr.on([l_slider.release, w_slider.release, spread.release], generate_fn, gen_inputs, gen_outputs,
                 js=STAMP_JS, api_visibility="private", trigger_mode="multiple", concurrency_limit=None,
                 concurrency_id="live", show_progress="hidden")
    density_fn = _readable(functools.partial(h.on_density, studio))
    # The density plot and the map are drawn when their tab is opened, not after every run: their features run
    # on the one torch worker, and after each run they made the next slider release wait behind them (session 12).
    gen.success(density_fn, visit, [density_plot, map_plot], api_name=api("density"), concurrency_limit=1,
                concurrency_id="sampling")
    for tab in (density_tab, browse_tab):
        tab.select(density_fn, visit, [density_plot, map_plot], api_visibility="private", concurrency_limit=1,
                   concurrency_id="sampling")
    stop_btn.click(None, None, None, cancels=[gen, live], queue=False, api_visibility="private")
    sweep_btn.click(gpu(_readable(functools.partial(sw.on_sweep, studio))),
                    [sweep_kind, l_slider, w_slider, steps, seed, sampler], [sweep_grid, sweep_text],
                    api_name=api("sweep"), concurrency_limit=1, concurrency_id="sampling")
    for grid, gallery in (("guided", guided), ("standard", standard)):
        gallery.select(_selected(studio, grid), visit, [nb_strip, nb_text, nb_why, nb_why_text], api_visibility="private",
                       concurrency_limit=1, concurrency_id="sampling")

    upload_fn = _readable(functools.partial(v.on_upload, studio, owned=functools.partial(claims_upload, demo)))
    upload.upload(gpu(lambda path: _with_slider(upload_fn(path))), upload,
                  [up_state, z_slider, seen, verdict_md, verdict_map, verdict_nb, verdict_why, verdict_why_text],
                  api_name=api("score_image"),
                  concurrency_limit=1, concurrency_id="sampling")
    z_slider.release(gpu(_readable(functools.partial(v.on_score, studio))), [up_state, z_slider],
                     [seen, verdict_md, verdict_map, verdict_nb, verdict_why, verdict_why_text], api_visibility="private",
                     concurrency_limit=1, concurrency_id="sampling")

    browse_fn = _readable(functools.partial(h.on_browse, studio))
    browse_io = ([order, class_filter, page, where], [browse, page, page_info])

    def browse_select(o, c, p, w, evt: gr.SelectData):
        return v.on_browse_select(studio, o, c, p, w, evt.index)

    browse.select(gpu(_readable(browse_select)), browse_io[0], [browse_why, browse_why_text], api_visibility="private",
                  concurrency_limit=1, concurrency_id="sampling")
    for ev in (order.change, class_filter.change, page.submit, where.submit):
        ev(browse_fn, *browse_io, api_visibility="private")
    prev_btn.click(lambda p: max(1, int(p or 1) - 1), page, page, queue=False, api_visibility="private").then(
        browse_fn, *browse_io, api_visibility="private")
    next_btn.click(lambda p: int(p or 1) + 1, page, page, queue=False, api_visibility="private").then(
        browse_fn, *browse_io, api_visibility="private")
    loads = ([browse_fn, class_fn, density_fn], [browse_io[0], [l_slider], [visit]],
             [browse_io[1], [l_words, l_examples], [density_plot, map_plot]])
    if first:  # the other bundles' pages fill in when the selector shows them
        demo.load(browse_fn, *browse_io, api_name="browse")
        demo.load(class_fn, l_slider, [l_words, l_examples], api_visibility="private")
        demo.load(density_fn, visit, [density_plot, map_plot], api_visibility="private")
    return loads


def _columns(studio: h.Studio) -> list:
    """The numeric metadata columns named in the bundle's real.csv header (no weights loaded)."""
    import csv

    with open(studio.path / "real.csv", newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    return [c for c in header if c not in ("path", "score", "label", "x", "y")]


def _filter_hint(cols: list) -> str:
    return f"{cols[0]} > 0" + (f", {cols[1]} = 1" if len(cols) > 1 else "") if cols else "(this bundle has no columns)"


def _selected(studio: h.Studio, grid: str):
    from . import verdicts as v

    def select(visit, evt: gr.SelectData):
        return v.on_select(studio, visit, grid, evt.index)

    return _readable(select)


def _with_slider(out: tuple) -> tuple:
    """on_upload's plain slider dict as a Gradio update."""
    state, ctl, *rest = out
    return (state, gr.update(**ctl), *rest)


def launch(demo: gr.Blocks, queue_size: int = QUEUE_SIZE, **kwargs):
    """Queue (bounded, one sampling run at a time: two users never thrash one CPU) and serve. Nothing is
    served from disk beyond Gradio's own cache: no allowed_paths, and no handler reads a path a user typed.
    Host and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT when set (as on Spaces)."""
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    return demo.launch(max_file_size=MAX_FILE_SIZE, show_error=True, footer_links=["api"],
                       app_kwargs={"exception_handlers": {FnIndexInferError: _unknown_api}}, **kwargs)


async def _unknown_api(request, exc) -> PlainTextResponse:
    """POST /gradio_api/call/<name> for a name no event has: 404 and one line (Gradio raises FnIndexInferError
    from its route, which became a 500). Registered on the FastAPI app through launch(app_kwargs=...).
    The /gradio_api/call/v2/<name> route fails earlier with a KeyError, still a 500: a handler for KeyError
    would turn every other KeyError into a 404 too."""
    return PlainTextResponse("unknown API name; the page's 'Use via API' link lists the endpoints", status_code=404)
