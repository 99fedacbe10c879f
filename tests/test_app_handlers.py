"""The app's handlers over the shipped bundle, without a browser (issue 5)."""
import csv
import io
import threading
import zipfile

import numpy as np
import pytest

from app import handlers as h
from core.errors import MinorityError


@pytest.fixture(scope="module")
def studio():
    return h.Studio(h.DEFAULT_BUNDLE)


def test_building_the_ui_loads_no_weights():
    from app.ui import build_ui

    s = h.Studio(h.DEFAULT_BUNDLE)
    demo = build_ui(s)
    assert s._bundle is None and demo is not None


@pytest.mark.parametrize("kwargs, msg", [
    ({"minority_class": 50}, "minority class l must be in \\[0, 49\\]"),
    ({"minority_class": -1}, "minority class"),
    ({"scale": 11}, "scale w must be in"),
    ({"n": 0}, "number of images"),
    ({"steps": 1000}, "steps must be in"),
    ({"method": "magic"}, "allowed: minority guidance, self-guided, Boost-and-Skip, standard"),
    ({"method": "Boost-and-Skip", "skip": 30}, "skip must be in"),
    ({"method": "Boost-and-Skip", "gamma": 0.5}, "gamma must be in"),
    ({"interval": 0}, "interval must be in"),
    ({"sampler": "euler"}, "allowed: DDIM"),
    ({"method": "self-guided", "sampler": "UniPC"}, "self-guided is defined for the samplers DDIM and ancestral \\(DDPM\\), not for UniPC"),
    ({"method": "Boost-and-Skip", "sampler": "Euler ancestral"}, "Boost-and-Skip is defined for the samplers"),
    ({"seed": "abc"}, "seed must be a number, got 'abc'"),
    ({"minority_class": float("nan")}, "minority class l must be in \\[0, 49\\], got nan"),
    ({"spread": float("nan")}, "range below l must be in \\[0, 10\\], got nan"),
    ({"scale": True}, "scale w must be a number, got True"),
    ({"n": True}, "number of images must be a number, got True"),
    ({"seed": 1.5}, "seed must be a whole number in \\[0, 2147483647\\], got 1.5"),
    ({"steps": 7.5}, "steps must be a whole number"),
    ({"seed": 10 ** 400}, "seed must be in \\[0, 2147483647\\], got 1000000000"),
    ({"spread": 11}, "range below l must be in"),
    ({"minority_class": 3, "spread": 4}, "range below l must be in \\[0, 3\\]"),
])
def test_bad_requests_are_readable_errors(studio, kwargs, msg):
    req = h.GenerateRequest(**{"minority_class": 49, "scale": 2.5, **kwargs})
    with pytest.raises(MinorityError, match=msg):
        req.check(studio.bundle.num_classes)


def test_a_range_of_classes_draws_each_images_l(studio, tmp_path):
    """Issue 15.6 in the app: 'Range below l' = r draws each image's class from l - r .. l, as the CLI's
    --minority-class A-B does with the same seed; the download's CSV lists each image's l."""
    import torch

    from core.maths.guidance import minority_targets

    req = h.GenerateRequest(49, 2.5, steps=5, n=4, seed=3, spread=4).check(studio.bundle.num_classes)
    t = req.targets()
    assert torch.equal(t, minority_targets("45-49", 4, 3, 50)) and set(t.tolist()) <= set(range(45, 50))
    assert "l ~ U{45..49}" in h.method_summary(req, 50)
    run = studio.generate_all(req)
    single = studio.generate_all(h.GenerateRequest(49, 2.5, steps=5, n=4, seed=3))
    assert not np.array_equal(run.guided, single.guided) and np.array_equal(run.standard, single.standard)
    with zipfile.ZipFile(h.export_run(run, tmp_path)) as z:
        rows = list(csv.DictReader(io.StringIO(z.read("samples.csv").decode())))
    assert [int(r["minority_class"]) for r in rows if r["grid"] == "guided"] == t.tolist()


def test_same_seed_same_images_other_seed_different(studio):
    req = h.GenerateRequest(49, 2.5, steps=5, n=2, seed=11)
    a, b = studio.generate_all(req), studio.generate_all(req)
    c = studio.generate_all(h.GenerateRequest(49, 2.5, steps=5, n=2, seed=12))
    assert np.array_equal(a.guided, b.guided) and np.array_equal(a.standard, b.standard)
    assert not np.array_equal(a.guided, c.guided)
    assert a.guided.shape == (2, 32, 32, 1) and a.guided_score.shape == (2,)
    assert not np.array_equal(a.guided, a.standard)  # guidance changed the images


def test_caption_scores_are_the_bundles_score_at_caption_draws(studio):
    import torch

    from core.maths.score import ScoreSettings, make_distance, minority_scores

    b = studio.bundle
    s = b.manifest["score"]
    assert s["draws"] > h.CAPTION_DRAWS and h.caption_draws(s) == h.CAPTION_DRAWS
    assert h.caption_draws({**s, "draws": 2}) == 2
    imgs = b.real.images[:3]
    want = minority_scores(b.model, torch.from_numpy(imgs.transpose(0, 3, 1, 2).copy()), torch.arange(3) + 7000,
                           ScoreSettings(s["distance"], s["t"], h.CAPTION_DRAWS, s["seed"]),
                           make_distance(s["distance"], seed=s["seed"], model=b.model))
    np.testing.assert_allclose(studio.score(imgs, seed=7), want, rtol=1e-5)


@pytest.mark.parametrize("label", list(h.SAMPLERS))
def test_every_app_sampler_generates_guided_and_standard(studio, label):
    """Issue 26: each sampler of the app's choice (ours and diffusers') runs the guided and the standard grid."""
    run = studio.generate_all(h.GenerateRequest(49, 2.5, steps=5, n=2, seed=4, sampler=label))
    assert run.guided.shape == run.standard.shape == (2, 32, 32, 1)
    assert not np.array_equal(run.guided, run.standard)


def test_the_page_starts_on_the_manifests_sampler_and_steps():
    assert h.app_defaults({}) == (h.DEFAULTS["sampler"], h.DEFAULTS["steps"])
    assert h.app_defaults({"app": {"sampler": "dpmpp-2m", "steps": 10}}) == ("DPM-Solver++ 2M", 10)
    assert h.app_defaults({"app": {"sampler": "ddpm"}}) == ("ancestral (DDPM)", h.DEFAULTS["steps"])
    assert h.app_defaults({"app": {"sampler": "unipc", "steps": 500}}) == ("UniPC", h.LIMITS["steps"][1])


def test_scale_zero_is_the_standard_sampler(studio):
    run = studio.generate_all(h.GenerateRequest(49, 0.0, steps=5, n=2, seed=3))
    assert np.array_equal(run.guided, run.standard)


def test_previews_arrive_before_the_final_grid(studio):
    stages = [(u.stage, u.step, u.guided is not None or u.standard is not None)
              for u in studio.generate(h.GenerateRequest(10, 1.0, steps=6, n=2, seed=21))]
    assert stages[0] == ("guided", 1, True)  # the first preview comes after step 1
    assert stages[-1][0] == "done"
    assert any(s[0] == "standard" for s in stages)


def test_stop_ends_the_run_and_the_steps(studio):
    stop = threading.Event()
    seen = []
    for u in studio.generate(h.GenerateRequest(49, 2.5, steps=100, n=4, seed=99), stop):
        seen.append(u.stage)
        if u.stage == "guided" and u.step >= 1:
            stop.set()
    assert seen[-1] == "stopped" and "done" not in seen


def test_on_generate_yields_gallery_items_and_a_download(studio, tmp_path):
    out = list(h.on_generate(studio, 49, 2.5, 5, 3, 4, "DDIM", "minority guidance", 3.0, 3, 5, 0, None))
    guided, standard, status, path, visit = out[-1]
    assert len(guided) == 3 and len(standard) == 3 and "l = 49" in status
    assert guided[0][0].shape == (h.DISPLAY, h.DISPLAY, 3) and float(guided[0][1].split(" · ")[0]) > 0
    assert status.startswith("Done") and len(visit.runs) == 1 and set(visit.samples) == {"standard", "minority guidance"}
    with zipfile.ZipFile(path) as z:
        rows = list(csv.DictReader(io.StringIO(z.read("samples.csv").decode())))
        assert len([n for n in z.namelist() if n.endswith(".png")]) == 6
    assert len(rows) == 6 and {"seed", "minority_class", "scale", "steps", "method", "score"} <= set(rows[0])
    assert rows[0]["seed"] == "4" and rows[0]["minority_class"] == "49" and rows[0]["method"] == "minority guidance"
    assert [r["method"] for r in rows if r["grid"] == "standard"] == ["standard"] * 3


def test_browse_ranks_pages_and_filters(studio):
    score = studio.bundle.real.score
    items, page, pages = studio.browse("most unique first", "all", 1, per_page=10)
    assert len(items) == 10 and page == 1 and pages == -(-len(score) // 10)
    first = float(items[0][1].split()[0])
    assert first == pytest.approx(float(score.max()), abs=1e-4)
    items, _, _ = studio.browse("most common first", "all", 1, per_page=10)
    assert float(items[0][1].split()[0]) == pytest.approx(float(score.min()), abs=1e-4)
    items, _, _ = studio.browse("most unique first", "7", 1)
    assert items and all(" c7" in cap for _, cap in items)
    _, page, pages = studio.browse("most unique first", "all", 10 ** 6)
    assert page == pages  # past the end: the last page
    with pytest.raises(MinorityError):
        studio.browse("most unique first", "x", 1)


def test_density_and_map_include_the_visit(studio):
    run = studio.generate_all(h.GenerateRequest(49, 2.5, steps=5, n=4, seed=5))
    visit = h.Visit().add(run)
    values = studio.density_values(visit)
    assert set(values) == {"real data", "standard", "minority guidance"}
    assert values["minority guidance"]["AvgkNN"].shape == (4,) and "severity" in values["standard"]
    assert np.isfinite(values["real data"]["LOF"]).all()
    pts = studio.map_points(visit)
    assert pts["minority guidance"].shape == (4, 2)
    dens, mp = h.on_density(studio, visit)
    assert len(dens.axes) >= 3 and mp.axes
    h.Visit.add(visit, run)  # the same standard grid is not counted twice
    assert len(visit.samples["standard"]) == 1 and len(visit.samples["minority guidance"]) == 2


def test_rarity_label_words():
    assert h.rarity_label(0, 50).endswith("most common")
    assert h.rarity_label(49, 50).endswith("rarest")
    assert h.class_choices(3) == ["all", "0", "1", "2"]


@pytest.mark.parametrize("method, extra", [("self-guided", {"interval": 2}), ("Boost-and-Skip", {"gamma": 3.0, "skip": 2})])
def test_training_free_methods_in_the_app(studio, method, extra):
    req = h.GenerateRequest(0, 2.0, steps=6, n=2, seed=8, method=method, **extra)
    run = studio.generate_all(req)
    assert run.guided.shape == run.standard.shape and not np.array_equal(run.guided, run.standard)
    same = studio.generate_all(h.GenerateRequest(0, 0.0, steps=6, n=2, seed=8, method=method,
                                                 **({"gamma": 1.0, "skip": 0} if method == "Boost-and-Skip" else extra)))
    assert np.array_equal(same.guided, same.standard)  # scale 0 / gamma 1 with no skip = standard
    visit = h.Visit().add(run)
    assert set(studio.density_values(visit)) == {"real data", "standard", method}
    assert method in h.method_summary(req, 50)


def test_self_guided_and_boost_skip_switch_to_the_ancestral_sampler():
    """Both training-free methods are defined for the ancestral sampler (the official self-guided code is
    ancestral; DDIM breaks both, docs/RESULTS.md): choosing them moves the sampler radio to ancestral."""
    from app.ui import _method_controls

    for method, ancestral in (("self-guided", True), ("Boost-and-Skip", True), ("minority guidance", False),
                              ("standard", False)):
        boost, self_box, sampler = _method_controls(method)
        assert (sampler.get("value") == "ancestral (DDPM)") is ancestral, method
        assert boost["visible"] is (method == "Boost-and-Skip") and self_box["visible"] is (method == "self-guided")


def test_class_panel_numbers_are_those_of_real_csv(studio):
    """Issue 18.2: the panel under the l slider says what class l is in the real data; its numbers equal those
    computed from the bundle's real.csv (label, score, severity columns)."""
    import csv as _csv

    with open(h.DEFAULT_BUNDLE / "real.csv", newline="") as f:
        rows = list(_csv.DictReader(f))
    for l in (0, 25, 49):
        members = [r for r in rows if int(r["label"]) == l]
        sev = np.array([float(r["severity"]) for r in members])
        sc = np.array([float(r["score"]) for r in members])
        c = studio.class_summary(l)
        assert c.count == len(members) and c.share == pytest.approx(len(members) / len(rows))
        assert c.score_min == pytest.approx(sc.min(), rel=1e-5) and c.score_max == pytest.approx(sc.max(), rel=1e-5)
        assert c.truth == pytest.approx((np.median(sev), sev.min(), sev.max()), abs=1e-4)
        text, strip = h.on_class(studio, l)
        assert f"**Class {l}**" in text and f"median {np.median(sev):.2f}" in text
        assert strip.shape == (h.DISPLAY, 3 * h.DISPLAY + 2 * 4, 3) and strip.dtype == np.uint8  # three examples
        assert all(int(rows[i]["label"]) == l for i in c.examples)
    assert "most unique" in h.on_class(studio, 49)[0]
    with pytest.raises(MinorityError, match="minority class l must be in"):
        studio.class_summary(50)


def test_finished_captions_show_the_estimated_atrophy(studio):
    out = list(h.on_generate(studio, 49, 2.5, 5, 2, 4, "DDIM", "minority guidance", 3.0, 3, 5, 0, None))
    guided_items = out[-1][0]
    est = studio.severity_estimator()
    run = out[-1][4].runs[-1]
    assert [cap for _, cap in guided_items] == [f"{s:.3f} · {a:.2f}" for s, a in zip(run.guided_score, np.clip(est(run.guided), 0, 1))]


def test_integral_floats_are_whole_numbers(studio):
    """7.0 for a whole-number field (a JSON client may send it) is the number 7; only fractions are refused."""
    req = h.GenerateRequest(49.0, 2, steps=5.0, n=2.0, seed=7.0, spread=3.0).check(studio.bundle.num_classes)
    assert (req.minority_class, req.steps, req.n, req.seed, req.spread) == (49, 5, 2, 7, 3)
    assert all(type(v) is int for v in (req.minority_class, req.steps, req.n, req.seed, req.spread))
    assert type(req.scale) is float and req.scale == 2.0


@pytest.mark.parametrize("where", ["A" * 100_000, "severity > " + "9" * 100_000 + "x"])
def test_a_long_browse_filter_is_not_echoed_whole(studio, where):
    """Probe browse_where_100k: a 100 KB filter came back whole in the error (100 139 bytes)."""
    with pytest.raises(MinorityError) as info:
        h.on_browse(studio, "most unique first", "all", 1, where)
    msg = str(info.value)
    assert msg.startswith("filter 'AAAA" if where[0] == "A" else "filter 'severity > 999") and "…" in msg
    assert len(msg) < 2 * h.ECHO_CHARS + 120 and "\n" not in msg, len(msg)
    assert h.clip_text("short") == "short" and len(h.clip_text("x" * 81)) == h.ECHO_CHARS


def test_upload_not_owned_is_neither_read_nor_deleted(studio, tmp_path):
    """/score_image reads and deletes only a file the server's upload route received (app.ui.claims_upload): any
    other path, such as another visitor's download zip in Gradio's cache, is refused and left in place."""
    from app import verdicts as v

    other = tmp_path / "abc123" / "minority-guidance_l49_w2.5_seed0_1.zip"
    other.parent.mkdir()
    other.write_bytes(b"PK\x03\x04 someone's download")
    asked = []
    with pytest.raises(MinorityError) as info:
        v.on_upload(studio, str(other), owned=lambda p: asked.append(p) or False)
    assert asked == [str(other)] and other.read_bytes() == b"PK\x03\x04 someone's download"
    assert str(info.value) == ("minority-guidance_l49_w2.5_seed0_1.zip: not a file uploaded to this tab; upload the "
                               "file itself (only files sent with the upload are read)")
    # an owned upload is read (refused by its content here: scoring costs the neighbour index ~10 s), then deleted
    # with its now empty per-upload folder (Gradio's <cache>/<hash>/)
    mine = tmp_path / "def456" / "slice.png"
    mine.parent.mkdir()
    mine.write_bytes(b"not an image")
    with pytest.raises(MinorityError, match="slice.png: not a PNG, JPEG or NIfTI file"):
        v.on_upload(studio, str(mine), owned=lambda p: True)
    assert not mine.exists() and not mine.parent.exists()


def test_claims_upload_takes_only_the_upload_routes_files_once(tmp_path):
    """The rule behind /score_image: a path is claimed when Gradio's upload route recorded it
    (Blocks.upload_file_set), and only once."""
    from types import SimpleNamespace

    from app.ui import claims_upload

    up = str(tmp_path / "h1" / "a.png")
    demo = SimpleNamespace(upload_file_set={up})
    assert not claims_upload(demo, str(tmp_path / "h2" / "download.zip"))
    assert not claims_upload(demo, str(tmp_path / "h1" / ".." / "h2" / "a.png"))
    assert claims_upload(demo, str(tmp_path / "h1" / "x" / ".." / "a.png"))  # the same file, spelled otherwise
    assert demo.upload_file_set == set() and not claims_upload(demo, up)  # a replay is refused


def test_the_level_sweep_shows_one_seed_at_five_classes_and_five_scales(studio):
    """Issue 26.3's sweep view: l = 0, L/4, L/2, 3L/4, L-1 at w (or w = 0..4 at l) from one seed; the captions
    carry each level, score and atrophy; on the MRI bundle the estimated atrophy at l = L-1 is above l = 0's and
    w = 4's above w = 0's (same noise: only the level changed)."""
    from app import sweep as sw

    L = studio.bundle.num_classes
    assert sw.levels(sw.SWEEP_KINDS[0], L) == [0, 12, 25, 37, 49]
    imgs, reqs, scores, atrophy = sw.sweep(studio, sw.SWEEP_KINDS[0], 49, 2.5, 10, 3, "DPM-Solver++ 2M")
    assert imgs.shape == (5, 32, 32, 1) and [r.minority_class for r in reqs] == [0, 12, 25, 37, 49]
    assert atrophy[-1] > atrophy[0] + 0.2, atrophy
    imgs_w, reqs_w, _, atrophy_w = sw.sweep(studio, sw.SWEEP_KINDS[1], 49, 2.5, 10, 3, "DPM-Solver++ 2M")
    assert [r.scale for r in reqs_w] == [0, 1, 2, 3, 4] and atrophy_w[-1] > atrophy_w[0] + 0.2, atrophy_w
    # w = 0 is the standard sampler from that seed, whatever l
    plain = studio.generate_all(h.GenerateRequest(0, 0.0, steps=10, n=1, seed=3, sampler="DPM-Solver++ 2M"))
    assert np.array_equal(imgs_w[0], plain.standard[0])
    items, text = sw.on_sweep(studio, sw.SWEEP_KINDS[0], 49, 2.5, 10, 3, "DPM-Solver++ 2M")
    assert len(items) == 5 and items[-1][1].startswith("l 49 · ") and len(items[-1][1].split(" · ")) == 3
    assert "estimated atrophy" in text
    assert "same noise" in text
    with pytest.raises(MinorityError, match="allowed: class l"):
        sw.levels("diagonal", L)
