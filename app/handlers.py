"""What the app does, as small functions over ``core``: no gradio import here, so every handler is
unit-tested without a browser. ``Studio`` holds one bundle (loaded lazily: importing this module loads
no weights) and the per-process caches; per-visitor history lives in ``Visit`` objects the UI keeps in
``gr.State``.
"""
from __future__ import annotations

import functools
import numbers
import queue
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np
import torch

from core.errors import MinorityError

if TYPE_CHECKING:
    from app.library import Pool

DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "assets" / "mri-atrophy"
from .request import (  # noqa: F401 - re-exported: the handlers' vocabulary
    DEFAULTS, ECHO_CHARS, FILTER_OPS, LIMITS, METHODS, OWN_SAMPLERS, SAMPLERS, GenerateRequest, browse_orders,
    clip_text, number, row_filter)
from .export import KEEP_EXPORTS, export_run  # noqa: E402,F401 - re-exported
from .words import (DISPLAY, app_defaults, captions, class_choices, display, method_summary,  # noqa: E402,F401
                    rarity_label)
from .live import RunSlots, acquire  # noqa: E402
PREVIEW_SECONDS = 1.0  # at most one grid preview per this many seconds (the first comes after step 1)
UNCHANGED = object()  # an output a handler leaves as it is (the UI turns it into gr.skip())
CAPTION_DRAWS = 5  # noise draws of a generated image's caption score: same expectation as the bundle's
# (20-draw) score, a quarter of its cost; 20 draws made a finished 4x4 pair 4 s slower (session 5)
# Each sampling run executes on a thread of its own (``run_in_thread``). Session 11 tried one long-lived worker for
# every run: no faster in-process (benchmarks/results/app_thread_cost.json), and in the browser test suite a later
# run on it could wait forever after an earlier server's session; it was reverted.
_LOAD_LOCK = threading.Lock()  # two bundles loading at once in Gradio's workers raced in diffusers' lazy import
_SAMPLING_LOCK = threading.Lock()  # one grid samples at a time, whichever studio, button or slider started it
# All of the app's torch work runs on this one long-lived thread (session 12, measured in docs/RESULTS.md): torch's
# OpenMP pool belongs to the thread that starts a parallel region, and a fresh thread per run made one 30-step grid
# take 3.27 s instead of 2.02 s on the main thread or 2.04 s on one worker, each in a fresh process. Session 11 tried
# this worker and reverted it for a browser-test failure that turned out to be the test's (a click off-screen).
TORCH_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-worker")


def on_torch_worker(fn):
    """Run ``fn`` on TORCH_WORKER and wait for it; called there already (a nested call), run it inline."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if threading.current_thread().name.startswith("torch-worker"):
            return fn(*args, **kwargs)
        return TORCH_WORKER.submit(fn, *args, **kwargs).result()
    return call


def caption_draws(score_settings: dict) -> int:
    """Noise draws of a generated image's caption score: the bundle's (manifest["score"]), at most CAPTION_DRAWS."""
    return min(int(score_settings["draws"]), CAPTION_DRAWS)


@dataclass(frozen=True)
class ClassSummary:
    """Class l in the real data: ``count`` slices (``share`` of all), score range, ground truth (median, min,
    max) or None, and the real rows of three examples."""

    minority_class: int
    count: int
    share: float
    score_min: float
    score_max: float
    truth: Optional[tuple]
    examples: list
    truth_label: Optional[str] = "atrophy"  # words for the truth column

    def text(self, num_classes: int) -> str:
        words = rarity_label(self.minority_class, num_classes).split(": ")[1]
        if not self.count:
            return f"**Class {self.minority_class}** ({words}): no real image has this class."
        top = ", the most unique" if self.minority_class == num_classes - 1 else \
            ", the most common" if self.minority_class == 0 else ""
        line = f"**Class {self.minority_class}** ({words}): {self.count} real images ({self.share:.0%} of the data{top})"
        line += f"; minority score {self.score_min:.4f} … {self.score_max:.4f}"
        if self.truth is not None:
            f = ".2f" if self.truth_label == "atrophy" else ".3g"  # atrophy lies in [0, 1]
            line += (f"; true {self.truth_label} median {self.truth[0]:{f}}, range {self.truth[1]:{f}} … "
                     f"{self.truth[2]:{f}}")
        return line + ". Three real examples:"


@dataclass
class Run:
    """A finished (or stopped) generation: uint8 images (N, H, W, C) and their minority scores (N,)."""

    request: GenerateRequest
    guided: np.ndarray
    guided_score: np.ndarray
    standard: np.ndarray
    standard_score: np.ndarray
    seconds: float


@dataclass
class Update:
    """What the grid shows now: ``stage`` in {'guided', 'standard', 'done', 'stopped'}; images uint8 NHWC."""

    stage: str
    step: int
    total: int
    guided: Optional[np.ndarray] = None
    standard: Optional[np.ndarray] = None
    run: Optional[Run] = None
    elapsed: float = 0.0


@dataclass
class Visit:
    """One visitor's generated samples so far, per method (for the density plots and the map)."""

    samples: dict = field(default_factory=dict)  # method name -> [uint8 (N, H, W, C)]; 'standard' included
    runs: list = field(default_factory=list)  # Run

    def add(self, run: Run) -> "Visit":
        r = run.request
        key = (r.seed, r.steps, r.n, r.sampler)
        if key not in {(q.request.seed, q.request.steps, q.request.n, q.request.sampler) for q in self.runs}:
            self.samples.setdefault("standard", []).append(run.standard)  # counted once: it ignores l and w
        if r.method != "standard":
            self.samples.setdefault(r.method, []).append(run.guided)
        self.runs.append(run)
        return self


class Stopped(Exception):
    pass


def _u8(x: torch.Tensor) -> np.ndarray:
    from core.maths.sampling import to_uint8

    return to_uint8(x)


class Studio:
    """The app's model side: one bundle, lazily loaded, and what is precomputed from it."""

    def __init__(self, bundle: str | Path = DEFAULT_BUNDLE, device: str = "cpu", pool: Optional["Pool"] = None):
        self.path = Path(bundle)
        self.device = device
        self.pool = pool  # shared by the studios of one app: at most pool.capacity bundles hold their models
        self._lock = threading.Lock()
        self._clear()
        self.export_dir = Path(tempfile.mkdtemp(prefix="minority-studio-"))
        self.warm_seconds: Optional[float] = None
        self.steps_done = 0  # sampler steps run by this process (a Stop must freeze it)
        self.runs = RunSlots()  # each visitor's newest run (live sliders: a new run stops the previous one)

    def _clear(self) -> None:
        """Drop the loaded bundle and everything computed from it."""
        self._bundle = None
        self._standard_cache: dict = {}
        self._density = None
        self._severity = None
        self._real_severity = None  # the estimator applied to the real images (N,)
        self._distance = None
        self._real_features = None  # (N, D) classifier features of the real data
        self._near_copy = None  # the near-copy threshold in those features

    # ---- loading ------------------------------------------------------------------------------
    @property
    def bundle(self):
        if self._bundle is None and self.pool is not None:
            self.pool.touch(self)  # before our lock: unloading another studio takes its lock
        with self._lock:
            if self._bundle is None:
                from core.bundles.bundle import load_bundle

                with _LOAD_LOCK:  # one bundle loads at a time: diffusers' lazy imports are not thread-safe
                    b = load_bundle(self.path, self.device)
                b.model.eval().requires_grad_(False)
                b.classifier.net.eval().requires_grad_(False)
                self._bundle = b
            b = self._bundle
        if self.pool is not None:
            self.pool.touch(self)  # outside our lock: the pool may unload another studio
        return b

    @property
    def loaded(self) -> bool:
        return self._bundle is not None

    def unload(self) -> None:
        """Free the weights and caches (the pool's eviction); the next use loads them again."""
        with self._lock:
            self._clear()

    @property
    def name(self) -> str:
        return str(self.manifest_cached().get("name") or self.path.name)

    def manifest_cached(self) -> dict:
        if getattr(self, "_manifest", None) is None:
            self._manifest = self.manifest()
        return self._manifest

    def truth_label(self) -> Optional[str]:
        """Words for the bundle's ground-truth column ('atrophy' for the MRI severity), or None."""
        name = self.bundle.real.truth_name
        return None if name is None else "atrophy" if name == "severity" else name.replace("_", " ")

    def manifest(self) -> dict:
        """The bundle's manifest without loading weights (for the UI's labels)."""
        from core.bundles.bundle import check_bundle

        return check_bundle(self.path)

    @on_torch_worker
    def warm(self) -> "Studio":
        """Load weights and precompute the density detectors and the severity estimator (background thread)."""
        t0 = time.perf_counter()
        self.density_model()
        self.severity_estimator()
        warm = GenerateRequest(0, 0.0, steps=LIMITS["steps"][0], n=1)
        self.generate_all(warm)  # first-call allocation costs, paid before the first visitor
        with self._lock:
            self._standard_cache.pop((warm.seed, warm.steps, warm.n, warm.sampler), None)
        self.warm_seconds = time.perf_counter() - t0
        return self

    # ---- generation ---------------------------------------------------------------------------
    def guidance(self, req: GenerateRequest):
        """The guidance term of the request's method (None for standard and Boost-and-Skip)."""
        from core.maths.guidance import ClassifierGuidance, SelfGuidance, combine

        if req.method == "minority guidance":
            target = req.targets() if req.spread else req.minority_class
            return combine(ClassifierGuidance(self.bundle.classifier.net, target, req.scale))
        if req.method == "self-guided":  # the bundle's score distance: it works offline
            return combine(SelfGuidance(self.bundle.model, req.scale, self.distance(), interval=req.interval,
                                        seed=req.seed))
        return None

    @staticmethod
    def init(req: GenerateRequest):
        from core.maths.sampling import BoostSkip

        return BoostSkip(req.gamma, req.skip) if req.method == "Boost-and-Skip" else None

    @on_torch_worker
    def _sample(self, req: GenerateRequest, guidance, on_step, stop: Optional[threading.Event],
                init=None) -> np.ndarray:
        from core.maths.sampling import sample

        g = torch.Generator().manual_seed(req.seed)  # the same seed gives the same x_T for both grids

        def callback(step):
            if stop is not None and stop.is_set():
                raise Stopped
            self.steps_done += 1
            on_step(step)

        x = sample(self.bundle.model, req.n, steps=req.steps, sampler=SAMPLERS[req.sampler], guidance=guidance,
                   generator=g, callback=callback, init=init)
        return _u8(x)

    @on_torch_worker
    def score(self, images: np.ndarray, seed: int = 0, draws: Optional[int] = None) -> np.ndarray:
        """Minority score (Eq. 7) of uint8 images (N, H, W, C) with the bundle's distance and t; ``draws`` noise
        draws (default: at most CAPTION_DRAWS, the captions' cost): float32 (N,)."""
        from core.maths.score import minority_scores

        settings = self.score_settings(draws)
        x = torch.from_numpy(np.array(images.transpose(0, 3, 1, 2)))  # a writable copy (uploads are read-only)
        idx = torch.arange(len(images)) + seed * 1000
        return minority_scores(self.bundle.model, x, idx, settings, self.distance())

    @on_torch_worker
    def explain(self, images: np.ndarray, seed: int = 0, draws: Optional[int] = None,
                rows: Optional[np.ndarray] = None):
        """Rarity maps (issue 27) of uint8 images (N, H, W, C) with the same draws as ``score`` (so the map's pixel
        mean is that score), or, for real images, their own noise ``rows`` (then the map averages to the stored
        score at the bundle's draws): core.evaluation.explain.Explained."""
        from core.evaluation.explain import explain_images

        idx = np.arange(len(images)) + seed * 1000 if rows is None else np.asarray(rows)
        return explain_images(self.bundle.model, np.ascontiguousarray(images), idx, self.score_settings(draws),
                              distance=self.distance())

    def score_settings(self, draws: Optional[int] = None):
        """The bundle's score settings with ``draws`` noise draws (default: the captions', at most CAPTION_DRAWS)."""
        from core.bundles.bundle import score_settings

        return score_settings(self.bundle.manifest, draws or caption_draws(self.bundle.manifest["score"]))

    def distance(self):
        """The bundle's score distance, with its seed (lpips-rand's random trunk depends on it); built once."""
        from core.maths.score import make_distance

        if self._distance is None:
            s = self.bundle.manifest["score"]
            self._distance = make_distance(s["distance"], self.device, seed=int(s["seed"]), model=self.bundle.model)
        return self._distance

    def generate(self, req: GenerateRequest, stop: Optional[threading.Event] = None) -> Iterator[Update]:
        """Guided grid first (with previews of x0_hat), then the standard grid with the same seed (cached:
        it does not depend on l or w). Raises nothing on Stop: yields a 'stopped' update and ends."""
        req = req.check(self.bundle.num_classes)
        t0 = time.perf_counter()
        q: queue.Queue = queue.Queue()
        stop = stop or threading.Event()
        key = (req.seed, req.steps, req.n, req.sampler)

        def work():
            try:
                last = [0.0]

                def on_step(stage):
                    def f(step):
                        now = time.perf_counter()
                        if step.index == 0 or (now - last[0] >= PREVIEW_SECONDS and step.index < step.total - 1):
                            last[0] = now
                            q.put(Update(stage, step.index + 1, step.total, **{stage: _u8(step.x0_hat)}))
                    return f

                if not acquire(_SAMPLING_LOCK, stop):  # one grid at a time; superseded while it waited
                    raise Stopped
                try:
                    guided = self._sample(req, self.guidance(req), on_step("guided"), stop, self.init(req))
                    kept = req.steps - (req.skip if req.method == "Boost-and-Skip" else 0)
                    q.put(Update("guided", kept, kept, guided=guided))
                    with self._lock:
                        cached = self._standard_cache.get(key)
                    if cached is None:
                        std = self._sample(req, None, on_step("standard"), stop)
                        cached = (std, self.score(std, req.seed))
                        with self._lock:  # keep the 8 newest grids
                            self._standard_cache = {**dict(list(self._standard_cache.items())[-7:]), key: cached}
                    std, std_score = cached
                    run = Run(req, guided, self.score(guided, req.seed), std, std_score, time.perf_counter() - t0)
                finally:
                    _SAMPLING_LOCK.release()
                q.put(Update("done", req.steps, req.steps, guided=guided, standard=std, run=run))
            except Stopped:
                q.put(Update("stopped", 0, req.steps))
            except Exception as e:  # noqa: BLE001 - handed to the UI thread as a readable message
                q.put(e)

        if threading.current_thread().name.startswith("torch-worker"):
            work()  # called on the worker already (warm-up): run here, then hand out its updates
        else:
            TORCH_WORKER.submit(work)
        try:
            while True:
                item = q.get()
                if isinstance(item, Exception):
                    raise item
                item.elapsed = time.perf_counter() - t0
                yield item
                if item.stage in ("done", "stopped"):
                    return
        finally:
            stop.set()  # a closed generator (Gradio's Stop) ends the worker at its next step

    def generate_all(self, req: GenerateRequest) -> Run:
        """The final Run of ``generate`` (for the API, scripts and tests)."""
        for u in self.generate(req):
            if u.stage == "done":
                return u.run
        raise MinorityError("generation stopped")

    # ---- density --------------------------------------------------------------------------------
    @on_torch_worker
    def features(self, images: np.ndarray) -> np.ndarray:
        """The bundle's feature space: the minority classifier's attention-pooled trunk at t = 0, (N, D)."""
        from core.evaluation.metrics import extract_features, make_extractor

        ex = make_extractor("classifier", device=self.device, classifier=self.bundle.classifier)
        return extract_features(ex, images, batch_size=256, device=self.device).pooled

    def real_features(self) -> np.ndarray:
        """The real data in the bundle's feature space, float64 (N, D); computed once."""
        if self._real_features is None:
            self._real_features = self.features(self.bundle.real.images).astype(np.float64)
        return self._real_features

    def neighbours_of(self, images: np.ndarray, k: int = 5):
        """core.evaluation.neighbours.Neighbours of uint8 images (M, H, W, C) among the real data, in the
        classifier's features, with the near-copy threshold of the real data (computed once)."""
        from core.evaluation.neighbours import find_neighbours, near_copy_threshold

        real = self.real_features()
        if self._near_copy is None:
            self._near_copy = near_copy_threshold(real)
        return find_neighbours(real, self.features(images).astype(np.float64), k, self._near_copy)

    def density_model(self):
        """PyOD AvgkNN (k=5) and LOF (k=20) fitted once on the real data's features."""
        with self._lock:
            if self._density is not None:
                return self._density
        from pyod.models.knn import KNN
        from pyod.models.lof import LOF

        real = self.real_features()
        knn, lof = KNN(method="mean", n_neighbors=5).fit(real), LOF(n_neighbors=20).fit(real)
        with self._lock:
            self._density = (knn, lof)
        return self._density

    def severity_estimator(self):
        """Ridge estimator of atrophy severity, for MRI bundles whose real data carries it; else None (no
        reader exists for other bundles' truth columns)."""
        real = self.bundle.real
        sev = real.truth
        if self._severity is None and real.truth_name == "severity" and real.has_truth:
            from core.evaluation.severity import SeverityEstimator

            self._severity = SeverityEstimator().fit(self.bundle.real.images, sev)
            self._real_severity = self._severity(self.bundle.real.images)
        return self._severity

    @on_torch_worker
    def atrophy(self, images: np.ndarray) -> Optional[np.ndarray]:
        """Estimated atrophy of uint8 images (N, H, W, C), clipped to [0, 1] for display (the ridge estimator
        extrapolates), or None when the bundle has no ground truth."""
        est = self.severity_estimator()
        return None if est is None else np.clip(est(images), 0, 1)

    def density_values(self, visit: Visit) -> dict:
        """{series: {'AvgkNN': (N,), 'LOF': (N,), 'severity': (N,) or absent}} for real, standard, guided."""
        knn, lof = self.density_model()
        est = self.severity_estimator()
        out = {"real data": {"AvgkNN": np.asarray(knn.decision_scores_), "LOF": np.asarray(lof.decision_scores_)}}
        if est is not None:
            out["real data"]["severity"] = self._real_severity  # estimated once, with the estimator
        for name, sets in visit.samples.items():
            if sets:
                images = np.concatenate(sets)
                f = self.features(images).astype(np.float64)
                out[name] = {"AvgkNN": knn.decision_function(f), "LOF": lof.decision_function(f)}
                if est is not None:
                    out[name]["severity"] = est(images)
        return out

    # ---- browse ---------------------------------------------------------------------------------
    def browse(self, order: str = "most unique first", class_filter: str = "all", page: int = 1,
               per_page: int = 24, where: str = "") -> tuple[list, int, int]:
        """A page of real images in ``order``, optionally one class and rows matching ``where`` (e.g.
        "hat = 1, rarity > 8"): ([(image uint8 HWC, caption)], page, pages). Captions: score, class, then every
        numeric metadata column."""
        real = self.bundle.real
        idx, page, pages = self.browse_rows(order, class_filter, page, per_page, where)
        items = []
        for i in idx:
            cap = f"{real.score[i]:.4f} · c{int(real.label[i])}"
            cap += "".join(f" · {c} {v[i]:.3g}" for c, v in real.metadata.items() if np.isfinite(v[i]))
            items.append((display(real.images[i]), cap))
        return items, page, pages

    def browse_rows(self, order: str = "most unique first", class_filter: str = "all", page: int = 1,
                    per_page: int = 24, where: str = "") -> tuple[np.ndarray, int, int]:
        """The real rows (int array) on a Browse page, the page and the page count (see ``browse``)."""
        real = self.bundle.real
        orders = browse_orders(real.metadata)
        if order not in orders:
            raise MinorityError(f"order must be one of: {', '.join(orders)}")
        if order in ("most unique first", "most common first"):
            idx = np.argsort(-real.score if order == "most unique first" else real.score, kind="stable")
        else:
            col, direction = order.rsplit(": ", 1)
            v = real.metadata[col]
            key = np.where(np.isfinite(v), -v if direction.startswith("high") else v, np.inf)  # unknowns last
            idx = np.argsort(key, kind="stable")
        if class_filter not in ("all", None, ""):
            try:
                c = int(class_filter)
            except ValueError:
                raise MinorityError(f"class filter must be 'all' or a class in [0, {self.bundle.num_classes})") from None
            idx = idx[real.label[idx] == c]
        idx = idx[row_filter(real.metadata, where, len(real.score))[idx]]
        pages = max(1, -(-len(idx) // per_page))
        page = int(min(max(1, int(page)), pages))
        return idx[(page - 1) * per_page: page * per_page], page, pages

    def class_summary(self, minority_class: int) -> "ClassSummary":
        """What class l is in the real data: its share, score range, the ground truth's median and range
        (where the bundle has one), and three real examples (those nearest the class's median score)."""
        real, L = self.bundle.real, self.bundle.num_classes
        if not 0 <= int(minority_class) < L:
            raise MinorityError(f"minority class l must be in [0, {L - 1}], got {minority_class}")
        members = np.flatnonzero(real.label == int(minority_class))
        label = self.truth_label()
        if not len(members):
            return ClassSummary(int(minority_class), 0, 0.0, float("nan"), float("nan"), None, [], label)
        scores = real.score[members]
        order = members[np.argsort(np.abs(scores - np.median(scores)), kind="stable")][:3]
        sev = real.truth[members]
        truth = (float(np.median(sev)), float(sev.min()), float(sev.max())) if real.has_truth else None
        return ClassSummary(int(minority_class), len(members), len(members) / len(real.score), float(scores.min()),
                            float(scores.max()), truth, [int(i) for i in order], label)

    def map_points(self, visit: Visit) -> dict:
        """2-D map: real coords (N, 2) and scores, plus the visitor's samples placed by k-NN (M, 2)."""
        from core.bundles.bundle import project

        real = self.bundle.real
        out = {"real": (real.coords, real.score)}
        for name, sets in visit.samples.items():
            if sets:
                out[name] = project(real, np.concatenate(sets))
        return out


def on_class(studio: Studio, minority_class) -> tuple:
    """(markdown, uint8 strip (H, 3 W, 3)) describing class l in the real data, for the panel under the l slider:
    the text and its three real examples side by side."""
    c = studio.class_summary(int(minority_class))
    real = studio.bundle.real
    tiles = [display(real.images[i]) for i in c.examples]
    if not tiles:
        return c.text(studio.bundle.num_classes), None
    gap = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
    strip = np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1)
    return c.text(studio.bundle.num_classes), strip


# ----------------------------------------------------------------------------------------------
# event handlers: plain values in, plain values out (gallery items, markdown, figures, file paths)


def on_generate(studio: Studio, minority_class, scale, steps, n, seed, sampler, method, gamma, skip, interval,
                spread, visit: Optional[Visit], issued=None, visitor=None):
    """Generator for Generate and the live sliders: yields (guided items, standard items, status markdown,
    download path or None, visit) while sampling runs; the last yield carries the finished run. ``visitor`` (the
    session) and ``issued`` (the browser's clock at the click or release, ms): the newest run of a visitor stops
    the older ones (app.live), and a run stopped that way shows nothing, as the newer one draws the page."""
    visit = visit or Visit()
    req = GenerateRequest(minority_class, scale, steps, n, seed, sampler, method, gamma, skip, interval,
                          spread).check(studio.bundle.num_classes)
    L = studio.bundle.num_classes
    ok = isinstance(issued, numbers.Real) and np.isfinite(issued) and issued > 0  # from the API: untrusted
    issued = float(issued) if ok else None
    slot, own = studio.runs.claim(visitor, issued)
    first = True
    try:
        for u in studio.generate(req, own):
            if u.stage == "stopped":
                if studio.runs.superseded(slot, own):  # a newer run of this visitor draws the page
                    yield UNCHANGED, UNCHANGED, UNCHANGED, UNCHANGED, UNCHANGED
                else:
                    yield UNCHANGED, UNCHANGED, f"Stopped after {u.elapsed:.1f} s.", None, visit
                return
            # only the grid that changed is sent; the first update also clears the other grid
            atrophy = studio.atrophy if u.run else (lambda images: None)  # finished grids: score and atrophy
            guided_items = captions(u.guided, u.run.guided_score if u.run else None, atrophy(u.guided)) \
                if u.guided is not None else UNCHANGED
            standard_items = captions(u.standard, u.run.standard_score if u.run else None, atrophy(u.standard)) \
                if u.standard is not None else ([] if first else UNCHANGED)
            first = False
            if u.stage == "done":
                visit.add(u.run)
                path = str(export_run(u.run, studio.export_dir))
                g, s = u.run.guided_score.mean(), u.run.standard_score.mean()
                status = (f"Done in {u.elapsed:.1f} s: {req.n} images, {req.steps} {req.sampler} steps, "
                          f"{method_summary(req, L)}. Mean minority score: {req.method} {g:.4f}, standard {s:.4f}.")
                yield guided_items, standard_items, status, path, visit
                return
            label = req.method if u.stage == "guided" else "standard sampler (same seed)"
            yield (guided_items, standard_items, f"Sampling {label}: step {u.step}/{u.total} ({u.elapsed:.1f} s)",
                   None, visit)
    finally:
        studio.runs.release(slot, own)


def on_browse(studio: Studio, order: str, class_filter: str, page, where: str = "") -> tuple:
    """(gallery items, page number, page caption) for the Browse tab."""
    items, page, pages = studio.browse(order, class_filter, int(page or 1), where=where)
    real = studio.bundle.real
    cols = "".join(f" · {c}" for c in real.metadata)
    keep = row_filter(real.metadata, where, len(real.score))
    if class_filter not in ("all", None, ""):
        keep &= real.label == int(class_filter)
    shown = f"{int(keep.sum())} of {len(real.score)} real images" if not keep.all() else f"{len(real.score)} real images"
    by = "minority score" if order in ("most unique first", "most common first") else order.split(": ")[0]
    return items, page, (f"Page {page} of {pages} · {shown} ranked by {by} ({order.split(': ')[-1]}). "
                         f"Captions: minority score · class c{cols}.")


def on_density(studio: Studio, visit: Optional[Visit]) -> tuple:
    """(density figure, map figure) over the real data and the visitor's samples so far."""
    from .plots import density_figure, map_figure

    visit = visit or Visit()
    return density_figure(studio.density_values(visit)), map_figure(studio.map_points(visit))
