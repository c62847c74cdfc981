"""`vis2ir app`: a web page (Gradio) that turns a photo into infrared with a trained model.

    vis2ir app [--checkpoint DIR] [--host 127.0.0.1] [--port 7860] [--share] [--device cpu] [--segment-model ID|PATH]
               [--keep-minutes 60] [--max-upload-mib 25]

By default it serves the two shipped demo models (`channel_concat` and the cross-attention adapter)
on the CPU, with nothing downloaded; `--checkpoint` serves a trained one instead. The page: example
ThermalScenes (held-out photo and semantic map, as thumbnails) one click away, upload or drop a photo and its map
(read by the package's one image reader: EXIF-upright, pixel limit, 16-bit), palette, bit depth,
steps and seed, a progress bar over the denoising steps, the result as a before/after slider and as
the compare picture, a PNG to download (8 or 16 bit, written by the package's one writer) and, for
cross-attention models only, where the adapter attends from a clicked point (mean and per head). A bad
upload gets the command line's one-line error in the page, and the result shown before stays. Requests are
queued one at a time.

The disk stays bounded: results and uploads are deleted `--keep-minutes` after they are made (the app's
own files by `App.results`, Gradio's copies and uploads by its `delete_cache`), the app's own result folders
are at most `KEEP_RESULTS` however many visitors come, Gradio's files for the page (uploads under the limit, its
copies of results) are at most `KEEP_FILES` in `KEEP_FILES_MIB`, the oldest deleted first (`BoundedFiles`), and
the example the page opens with is generated once and shown to every later visitor. Memory stays bounded too: a visitor's page state holds only the key of its
last result; the results themselves (the photo and the attention maps) are kept by `Kept`, the newest
`KEEP_RESULTS` of all visitors within `KEEP_RESULT_MIB`, the oldest dropped. An upload over
`--max-upload-mib` is refused by the server before it is stored, and by `App.generate` before it is decoded.

The top layer of the package: it imports the lower ones, nothing imports it (the CLI imports it lazily,
so `gradio`, the optional `app` extra, is needed only here).
"""

from __future__ import annotations

import atexit
import errno
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from vis2ir.app_views import attention_note, example_scenes, example_thumbnails, shown
from vis2ir.checkpoint import SHIPPED
from vis2ir.config import APP_KEEP_MINUTES, APP_MAX_UPLOAD_MIB, DEFAULT_SEGMENTER, SEED_LIMIT
from vis2ir.errors import Vis2IRError, first_line
from vis2ir.figures import figure_array
from vis2ir.files import write_error
from vis2ir.io.images import read_image, rgb_image, to_tensor, write_png
from vis2ir.io.runtime import default_device
from vis2ir.pipeline import Vis2IRPipeline, check_map
from vis2ir.visualize import PALETTES, as_rgb8, check_output_format, compare_figure, infrared_image, save_attention_maps

log = logging.getLogger(__name__)

KEEP_MINUTES_LIMIT = 525_600  # a year: longer is a typo, and Gradio's schedule wants seconds it can sleep
CLEAN_EVERY_S = 600  # Gradio's cache is swept this often (or every keep time, if shorter)
KEEP_RESULTS = 32  # results kept in memory (all visitors together) and result folders kept on disk, at most
KEEP_RESULT_MIB = 1024  # MiB of results (photos and attention maps) kept in memory, at most
UPLOAD_MIB_LIMIT = 4096  # the largest --max-upload-mib: larger is a typo
KEEP_FILES_MIB = 1024  # MiB of Gradio's files for the page (uploads, its copies of results) kept, at most
KEEP_FILES = 64  # and how many of them, at most: the oldest are deleted first (`BoundedFiles`)


def load_models(checkpoint: str | Path | None = None, device=None) -> dict[str, Vis2IRPipeline]:
    """The models the page serves, by their label ('demo (channel_concat)'): the shipped demo models on the
    CPU, or the checkpoint (or run folder) `checkpoint` on `device` (default: CUDA when there is one)."""
    sources = list(SHIPPED.values()) if checkpoint is None else [checkpoint]
    device = device or ("cpu" if checkpoint is None else None)
    models = {}
    for source in sources:
        pipe = Vis2IRPipeline.from_checkpoint(source, device)
        name = Path(source).name if checkpoint is None else str(checkpoint)
        models[f"{name} ({pipe.model.mode})"] = pipe
    return models


@dataclass
class Result:
    """One generation, kept per visitor (gr.State) for the attention view."""

    visible: np.ndarray        # the photo as the model saw it: uint8 RGB [H, W, 3], upright
    attention: object = None   # AttentionMaps (cross-attention models), else None

    @property
    def nbytes(self) -> int:
        """The memory it holds, in bytes (the photo and the attention weights)."""
        weights = getattr(self.attention, "weights", None)
        return self.visible.nbytes + (0 if weights is None else weights.numel() * weights.element_size())


class Kept:
    """The results of all visitors, by key: the newest `count` within `max_bytes`, the oldest dropped first.
    A visitor's page state holds only a key, so memory does not grow with the number of visitors."""

    def __init__(self, count: int = KEEP_RESULTS, max_bytes: int = KEEP_RESULT_MIB * 2**20):
        self.count, self.max_bytes = count, max_bytes
        self._results: OrderedDict[str, Result] = OrderedDict()
        self._pinned: dict[str, Result] = {}  # the opening examples': shown to every visitor, never dropped
        self._lock = threading.Lock()

    def put(self, result: Result, replaces: str | None = None) -> str:
        """Keep `result` (dropping `replaces`, the visitor's previous one, and the oldest beyond the bounds);
        returns its key. A result larger than `max_bytes` on its own is not kept."""
        key = uuid.uuid4().hex
        with self._lock:
            self._results.pop(replaces, None)
            self._results[key] = result
            while self._results and (len(self._results) > self.count or self.nbytes > self.max_bytes):
                dropped, _ = self._results.popitem(last=False)
                log.debug("dropped result %s (keeping %d results within %d bytes)", dropped, self.count,
                          self.max_bytes)
        return key

    def pin(self, key: str) -> None:
        """Keep the result under `key` for the app's lifetime, outside the bounds (an opening example's)."""
        with self._lock:
            if key in self._results:
                self._pinned[key] = self._results.pop(key)

    def get(self, key: str | None) -> Result | None:
        """The result kept under `key`, or None (no key, or dropped since)."""
        with self._lock:
            return (self._pinned.get(key) or self._results.get(key)) if key else None

    def __len__(self) -> int:
        return len(self._results)

    @property
    def nbytes(self) -> int:
        """The memory the kept results hold, in bytes."""
        return sum(r.nbytes for r in self._results.values())


class App:
    """The page's functions, independent of Gradio's event wiring (so they can be called directly)."""

    def __init__(self, models: dict[str, Vis2IRPipeline], workdir: Path, segment_model: str | None = None,
                 keep_s: float = APP_KEEP_MINUTES * 60, max_upload_bytes: int = APP_MAX_UPLOAD_MIB * 2**20,
                 kept: Kept | None = None):
        self.models, self.workdir, self.keep_s = models, Path(workdir), keep_s
        self.max_upload_bytes = max_upload_bytes
        self.kept = kept if kept is not None else Kept()
        self.segment_model = segment_model or DEFAULT_SEGMENTER
        self._segmenter = None
        self._examples: dict[tuple, tuple] = {}
        self._examples_lock = threading.Lock()

    def results(self) -> Path:
        """A new folder (not made yet) for one request's files under `workdir/results`, after deleting the
        folders there last modified more than `keep_s` seconds ago, and the oldest beyond the newest
        `kept.count - 1`: what a long-running page writes stays bounded by what it made in the keep time, and
        by `kept.count` folders however many visitors come. (Gradio has copied a result into its own cache
        by the time the next request runs: requests are queued one at a time.)"""
        root = self.workdir / "results"
        cutoff = time.time() - self.keep_s
        ages = []
        for old in root.iterdir() if root.is_dir() else ():
            try:
                ages.append((old.stat().st_mtime, old))
            except FileNotFoundError:  # swept by a request running beside this one
                continue
        ages.sort(reverse=True)
        for rank, (mtime, old) in enumerate(ages):
            if mtime < cutoff or rank >= self.kept.count - 1:
                shutil.rmtree(old, ignore_errors=True)
                log.debug("deleted %s (older than %g s, or beyond the newest %d)", old, self.keep_s, self.kept.count)
        return root / uuid.uuid4().hex

    def check_upload(self, path: str | Path, label: str) -> None:
        """Refuse, in one line, the upload `path` (shown as `label`) when it is larger than `max_upload_bytes`:
        checked before it is decoded."""
        try:
            size = os.path.getsize(path)
        except OSError:
            return  # the image reader names a file it cannot read
        if size > self.max_upload_bytes:
            raise Vis2IRError(f"{label}: {size / 2**20:.1f} MiB, over the upload limit of "
                              f"{self.max_upload_bytes / 2**20:g} MiB (vis2ir app --max-upload-mib); send a smaller "
                              "file")

    def example(self, inputs: tuple, progress=None):
        """`generate(*inputs)`, computed the first time and the same result every later time: the example the
        page opens with, generated once for all visitors. Its files are kept for the app's lifetime, under
        `workdir/examples` (not swept with the results)."""
        with self._examples_lock:  # two first visitors at once: one generation
            if inputs not in self._examples:
                folder = self.workdir / "examples" / "results" / str(len(self._examples))
                self._examples[inputs] = self.generate(*inputs, progress=progress, folder=folder)
                self.kept.pin(self._examples[inputs][4])
            return self._examples[inputs]

    def _semantic(self, pipe: Vis2IRPipeline, visible: Image.Image, photo_label: str, map_file: str | None):
        """The semantic map for the photo: the upload (checked as `generate` checks it), else one made by
        the panoptic segmenter when its weights are on this machine; None when the model reads none, or when a
        model trained with `train.semantic_dropout` gets no map and no segmenter is here (it reads the unknown map)."""
        if not pipe.needs_semantic:
            return None
        if map_file:
            label = f"semantic map {Path(map_file).name}"
            self.check_upload(map_file, label)
            semantic = read_image(map_file, label)
            check_map(semantic, visible, label, photo_label, warn_void=not pipe.reads_no_map)
            return semantic
        if pipe.reads_no_map and self._segmenter is None and not self._segmenter_here():
            return None
        return Image.fromarray(self.segmenter(pipe)([visible])[0].colours())

    def _segmenter_here(self) -> bool:
        """Whether the segmenter's weights are on this machine (a local folder, or the Hub cache)."""
        from vis2ir.hub import cached_snapshot, is_local
        from vis2ir.segment import NEEDED_FILES

        if is_local(self.segment_model) and Path(self.segment_model).expanduser().is_dir():
            return True
        return cached_snapshot(self.segment_model, NEEDED_FILES, weights=(".",)) is not None

    def segmenter(self, pipe: Vis2IRPipeline):
        """The panoptic segmenter (`--segment-model`), loaded once on `pipe`'s device, only from weights already
        on this machine (no download)."""
        if self._segmenter is None:
            from vis2ir.segment import Segmenter

            if not self._segmenter_here():
                raise Vis2IRError(
                    f"this model (mode {pipe.model.mode}) needs a semantic map: upload one beside the photo (the project's "
                    f"palette; `vis2ir segment` makes them), or put the panoptic segmenter's weights on this machine "
                    f"(`hf download {self.segment_model}`) and the page makes it")
            self._segmenter = Segmenter(self.segment_model, pipe.device, setting="vis2ir app --segment-model")
        return self._segmenter

    def generate(self, model: str, photo: str | None, semantic: str | None, palette: str, bit_depth: int,
                 steps: int, seed: int, progress=None, folder: Path | None = None, previous: str | None = None):
        """Infrared for the uploaded photo: `(slider pair, compare picture, PNG path, photo to click, state,
        attention note)`; the PNG goes into `folder` (default: a new `results()` folder). The state is the key
        of the result in `kept` (which drops `previous`, the visitor's last one). Raises `Vis2IRError` for a
        bad upload (too large: `check_upload`) or setting (one line)."""
        if photo is None:
            raise Vis2IRError("no photo: upload or drop a visible photo (or click an example below)")
        pipe = self.models[model]
        bit_depth = int(bit_depth)
        check_output_format(bit_depth, palette)
        settings = pipe.cfg.sample.replaced(steps=int(steps), seed=int(seed))  # the settings' one validator
        label = f"photo {Path(photo).name}"
        self.check_upload(photo, label)
        visible = read_image(photo, label)
        semantic = self._semantic(pipe, visible, label, semantic)
        callback = None if progress is None else lambda done, total: progress((done, total), desc="denoising")
        attend = pipe.model.adapter is not None
        photo_t = to_tensor(visible, label, pipe.normaliser)  # [3, H, W] in [0, 1], once: shown and generated
        result = pipe(photo_t, semantic, steps=settings.steps, seed=settings.seed, output_type="pt",
                      return_attention=attend, callback=callback)
        grey = result.images[0].mean(0).numpy()
        seen = as_rgb8(photo_t.permute(1, 2, 0).numpy())
        stem = Path(photo).stem
        png = write_png((folder or self.results()) / f"{stem}_infrared_{bit_depth}bit.png",
                        infrared_image(grey, bit_depth, palette), full_range=True)
        ir8 = infrared_image(grey, 8, palette)
        panels = {"visible": seen} | ({} if semantic is None else {"semantic": np.asarray(rgb_image(semantic))})
        panels[f"generated infrared ({palette})"] = ir8
        compare = figure_array(compare_figure(panels, f"{stem}: visible → infrared ({model})"))
        key = self.kept.put(Result(seen, result.attention[0] if attend else None), replaces=previous)
        return (shown(seen), shown(as_rgb8(ir8))), compare, str(png), shown(seen), key, attention_note(
            pipe.model.mode, attend)

    def attention(self, key: str | None, x: float, y: float) -> tuple[str, str]:
        """Where the adapter attends from the point `(x, y)` of the shown photo of the result kept under `key`:
        the pictures of `save_attention_maps` (mean over heads, per head) as PNG paths."""
        state = self.kept.get(key)
        if state is None and key:
            raise Vis2IRError(f"this result is no longer kept (the page keeps the last {self.kept.count} results "
                              "of all visitors): generate again, then click")
        if state is None or state.attention is None:
            raise Vis2IRError("no attention maps: generate with a cross-attention model first")
        h, w = state.visible.shape[:2]
        scale = shown(state.visible).shape[0] / h  # the photo is shown enlarged
        folder = self.results()
        point = (min(x / scale, w - 0.5), min(y / scale, h - 0.5))
        mean, heads = save_attention_maps(folder, state.visible, state.attention, [point])
        return str(mean), str(heads)


def page_error(err: Vis2IRError) -> gr.Error:
    """A bad upload or setting: its one line in the page and in the server's log, no traceback in either."""
    log.warning("%s", err)
    return gr.Error(str(err), print_exception=False)


def keep_seconds(minutes: float) -> int:
    """`--keep-minutes` in whole seconds (at least 1), or a one-line `Vis2IRError` for a value that is not a
    number of minutes from more than 0 to `KEEP_MINUTES_LIMIT`."""
    number = isinstance(minutes, (int, float)) and not isinstance(minutes, bool)
    if not (number and math.isfinite(minutes) and 0 < minutes <= KEEP_MINUTES_LIMIT):
        given = format(minutes, "g") if number else repr(minutes)
        raise Vis2IRError(f"--keep-minutes {given}: expected a number of minutes above 0 and at most "
                          f"{KEEP_MINUTES_LIMIT} (how long results and uploads are kept)")
    return max(1, round(minutes * 60))


def build_app(models: dict[str, Vis2IRPipeline], workdir: str | Path, segment_model: str | None = None,
              keep_s: int = APP_KEEP_MINUTES * 60, max_upload_bytes: int = APP_MAX_UPLOAD_MIB * 2**20) -> gr.Blocks:
    """The page for `models` (label → pipeline); results' files go under `workdir`; photos without a map are
    segmented by `segment_model` (default: `DEFAULT_SEGMENTER`) when its weights are here. Results, uploads and
    Gradio's copies are deleted about `keep_s` seconds after they are made (within `CLEAN_EVERY_S` more); an
    upload over `max_upload_bytes` is refused (`App.check_upload`; `serve` has Gradio refuse it at upload).

    The attention panel (the photo to click, the maps) shows only for a result of a model with an attention
    adapter. A request's progress bar and its error show in the status line under **Generate**, so an error
    leaves the previous result on the page (the error itself comes as Gradio's notice, and to API clients)."""
    app = App(models, Path(workdir), segment_model, keep_s, max_upload_bytes)
    first = next(iter(models.values()))
    examples = example_scenes(Path(workdir) / "examples", first)
    thumbnails = example_thumbnails(examples, Path(workdir) / "examples" / "thumbnails")
    # what the page opens with, and the example generated for it: one set of values for both
    opening = (next(iter(models)), *examples[0], "white-hot", 8, first.cfg.sample.steps, first.cfg.sample.seed)
    generate, example, attend = _events(app, opening)

    def pick(evt: gr.SelectData) -> list[str]:  # an example's photo or map clicked: both (`example_thumbnails`)
        return examples[evt.index // 2]

    with gr.Blocks(title="vis2ir: visible → infrared", delete_cache=(min(keep_s, CLEAN_EVERY_S), keep_s)) as page:
        gr.Markdown("## vis2ir: visible → infrared\nUpload or drop a photo and its semantic map (or click an "
                    "example scene), then **Generate**. The result is on the right: drag the slider to compare.")
        state = gr.State()
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(list(models), value=opening[0], label="model", elem_id="model")
                photo = gr.File(label="visible photo (any size; EXIF-upright)", file_types=["image"],
                                value=opening[1], elem_id="photo")
                semantic = gr.File(label="semantic map (palette colours; not needed for mode none)",
                                   file_types=["image"], value=opening[2], elem_id="semantic")
                with gr.Row():
                    palette = gr.Radio(list(PALETTES), value=opening[3], label="palette")
                    bit_depth = gr.Radio([8, 16], value=opening[4], label="PNG bit depth (16: grey palettes)")
                with gr.Row():
                    steps = gr.Slider(1, 50, value=opening[5], step=1, label="denoising steps")
                    seed = gr.Number(value=opening[6], precision=0, minimum=0, maximum=SEED_LIMIT - 1, label="seed")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.Markdown(elem_id="status", min_height=48)
                gallery = gr.Gallery(thumbnails, label="ThermalScenes (held out): click a scene for its photo and map",
                                     columns=4, allow_preview=False, interactive=False,
                                     object_fit="contain", height="fit-content", elem_id="examples")
            with gr.Column(scale=1):
                slider = gr.ImageSlider(label="visible | infrared (drag the slider)", type="numpy",
                                        elem_id="result")
                download = gr.File(label="download the infrared PNG")
        with gr.Row():
            compare = gr.Image(label="compare", show_label=False, type="numpy", interactive=False, elem_id="compare")
        note = gr.Markdown(elem_id="note")
        with gr.Column(visible=False, elem_id="attention") as panel:
            with gr.Row():
                clickable = gr.Image(label="click a point: where does the adapter attend?", type="numpy",
                                     interactive=False, elem_id="clickable")
                mean = gr.Image(label="attention from the point (mean over heads)", show_label=False, type="filepath",
                                interactive=False, elem_id="mean")
            heads = gr.Image(label="per head", show_label=False, type="filepath", interactive=False, elem_id="heads")
        inputs = [model, photo, semantic, palette, bit_depth, steps, seed, state]
        outputs = [slider, compare, download, clickable, state, note, panel, mean, heads, status]
        button.click(generate, inputs, outputs, api_name="generate", show_progress_on=[status])
        # a result at once: the first example, made once
        page.load(example, None, outputs, api_name="example", show_progress_on=[status])
        clickable.select(attend, [state], [mean, heads])
        gallery.select(pick, None, [photo, semantic])
    bound_files(page, KEEP_FILES_MIB * 2**20, KEEP_FILES)
    return page


def _events(app: App, opening: tuple):
    """The page's event functions around `app` (`generate`, the opening `example`, `attend` to a clicked
    point): a `Vis2IRError` becomes the page's one-line error (`page_error`); a result also sets the attention
    panel's visibility, clears the maps of the previous result and says in the status line what was made."""

    def finished(values: tuple, model: str, what: str) -> tuple:
        attends = app.models[model].model.adapter is not None
        return (*values, gr.update(visible=attends), None, None, f"{what} → infrared by {model}")

    def generate(model, photo, semantic, palette, bit_depth, steps, seed, previous, progress=gr.Progress()):
        try:
            values = app.generate(model, photo, semantic, palette, bit_depth, steps, seed, progress, previous=previous)
        except Vis2IRError as err:
            raise page_error(err) from None
        return finished(values, model, f"{Path(photo).name} ({int(steps)} steps, seed {int(seed)})")

    def example(progress=gr.Progress()):
        try:
            values = app.example(opening, progress)
        except Vis2IRError as err:
            raise page_error(err) from None
        return finished(values, opening[0], f"example {Path(opening[1]).name}")

    def attend(state, evt: gr.SelectData):
        try:
            return app.attention(state, *evt.index[:2])
        except Vis2IRError as err:
            raise page_error(err) from None

    return generate, example, attend


class BoundedFiles(set):
    """Gradio's set of the files uploaded to a page (`Blocks.upload_file_set`, updated by its upload route), which
    each time files are added deletes the oldest of all the files Gradio keeps for the page (`temp_file_sets`:
    uploads and its copies of results; not those the page was built with, like the examples) beyond `max_files` files
    or `max_bytes` bytes in all, the files just added aside. So the disk holds at most about `max_bytes` plus the
    latest upload whatever the keep time, however many visitors upload. `bound` deletes; it returns their paths."""

    def __init__(self, page: gr.Blocks, max_bytes: int = KEEP_FILES_MIB * 2**20, max_files: int = KEEP_FILES):
        super().__init__()
        self.page, self.max_bytes, self.max_files = page, max_bytes, max_files
        self.lasting = {str(p) for group in page.temp_file_sets for p in group}  # the examples, the opening values

    def update(self, *others) -> None:
        added = set().union(*others)
        super().update(added)
        self.bound(keep=added)

    def add(self, item) -> None:
        super().add(item)
        self.bound(keep={item})

    def bound(self, keep=frozenset()) -> list[str]:
        """Delete the oldest files beyond the bounds (by modification time; `keep` and missing files aside)."""
        lasting = self.lasting.union(*(getattr(c, "keep_in_cache", set()) for c in self.page.blocks.values()))
        files = []
        for group in self.page.temp_file_sets:
            for path in list(group):
                try:
                    info = os.lstat(path)
                except OSError:  # not moved into the cache yet, or deleted already
                    continue
                if str(path) not in lasting:
                    files.append((path in keep, info.st_mtime_ns, str(path), info.st_size, group))
        files.sort(reverse=True)  # those just added first, then the newest
        total, count, deleted = 0, 0, []
        for fresh, _, path, size, group in files:
            if fresh or (total + size <= self.max_bytes and count < self.max_files):
                total, count = total + size, count + 1
                continue
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            except OSError as err:
                log.warning("cannot delete %s (%s)", path, err.strerror or err)
                continue
            group.discard(path)
            deleted.append(path)
        if deleted:
            log.debug("deleted %d of Gradio's files (beyond %d files or %d bytes)", len(deleted), self.max_files,
                      self.max_bytes)
        return deleted


def bound_files(page: gr.Blocks, max_bytes: int = KEEP_FILES_MIB * 2**20, max_files: int = KEEP_FILES) -> None:
    """Make `page`'s set of uploaded files a `BoundedFiles`: every upload deletes the oldest of Gradio's files
    for the page beyond `max_bytes` or `max_files`; call it once the page is built (its files stay)."""
    old = page.upload_file_set
    page.upload_file_set = BoundedFiles(page, max_bytes, max_files)
    page.upload_file_set.update(old)
    page.temp_file_sets = [page.upload_file_set if group is old else group for group in page.temp_file_sets]


def check_port(host: str, port: int) -> None:
    """Refuse, in one line, a port out of range or one that cannot be listened on at `host` (in use, say):
    checked by binding it, before the models load."""
    if not 1 <= port <= 65535:
        raise Vis2IRError(f"--port {port}: expected a port number from 1 to 65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (OSError, UnicodeError) as err:
        raise Vis2IRError(f"--host {host}: not an address of this machine ({first_line(err)})") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Gradio's server does
        try:
            s.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise Vis2IRError(f"--port {port}: already in use on {host}; pick another with --port N") from None
            raise Vis2IRError(f"--port {port}: cannot listen on {host} ({first_line(err)}); pick another --port N "
                              "or --host") from None


def upload_bytes(mib: float) -> int:
    """`--max-upload-mib` in bytes, or a one-line `Vis2IRError` for a value that is not a number of MiB from
    more than 0 to `UPLOAD_MIB_LIMIT`."""
    number = isinstance(mib, (int, float)) and not isinstance(mib, bool)
    if not (number and math.isfinite(mib) and 0 < mib <= UPLOAD_MIB_LIMIT):
        given = format(mib, "g") if number else repr(mib)
        raise Vis2IRError(f"--max-upload-mib {given}: expected a number of MiB above 0 and at most "
                          f"{UPLOAD_MIB_LIMIT} (the largest photo or map a visitor may upload)")
    return max(1, round(mib * 2**20))


def serve(checkpoint: str | Path | None = None, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          device=None, block: bool = True, segment_model: str | None = None,
          keep_minutes: float = APP_KEEP_MINUTES, max_upload_mib: float = APP_MAX_UPLOAD_MIB) -> gr.Blocks:
    """Serve the page (one request at a time, the others queued) until interrupted, or, without `block`,
    in the background (`page.close()` stops it); results and uploads are kept `keep_minutes`; an upload over
    `max_upload_mib` MiB is refused by the server before it is stored. Returns the page. A bad port, host,
    device, keep time or upload limit is a one-line `Vis2IRError` before the models load."""
    keep_s = keep_seconds(keep_minutes)
    max_bytes = upload_bytes(max_upload_mib)
    check_port(host, port)
    if device is not None:
        default_device(device)
    try:  # uploads and results: before the models load, a system temp folder that cannot be written is one line
        workdir = Path(tempfile.mkdtemp(prefix="vis2ir-app-"))
    except OSError as err:
        raise write_error(tempfile.gettempdir(), err, "the app's working folder; set TMPDIR to another") from None
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    models = load_models(checkpoint, device)
    page = build_app(models, workdir, segment_model, keep_s, max_bytes)
    page.queue(default_concurrency_limit=1)
    try:
        page.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True,
                    allowed_paths=[str(workdir)], max_file_size=max_bytes)
    except OSError as err:  # taken since check_port, or Gradio's own check refused it
        log.debug("launch failed: %s", err)
        raise Vis2IRError(f"--port {port}: already in use on {host}; pick another with --port N") from None
    log.info("Serving %s on %s%s", ", ".join(models), page.local_url,
             f" and {page.share_url}" if share and page.share_url else "")
    if block:
        page.block_thread()
    return page
