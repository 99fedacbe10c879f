"""The app served over HTTP (issue 5): gradio_client API calls and the public-Space safety probes of
TESTING.md (paths, upload size, bounded queue, Stop)."""
import atexit
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
if "GRADIO_TEMP_DIR" not in os.environ:  # a cache of this run's own: the file counts below see no other process
    os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="gradio-test-")
    atexit.register(shutil.rmtree, os.environ["GRADIO_TEMP_DIR"], True)
from gradio_client import Client  # noqa: E402

from app import handlers as h  # noqa: E402
from app.ui import MAX_FILE_SIZE, build_ui, launch  # noqa: E402

GENERATE = [49, 2.5, 5, 1, 1, "DDIM", "minority guidance", 3.0, 3, 5, 0]  # one image, 5 steps: about 0.3 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    studio = h.Studio(h.DEFAULT_BUNDLE)
    demo = build_ui(studio)
    port = _free_port()
    launch(demo, queue_size=2, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    yield studio, url, Client(url, verbose=False)
    demo.close()


def _get(url):
    import httpx

    return httpx.get(url, timeout=10, follow_redirects=False)


def _call(url, api, body: str):
    """POST a raw JSON body (NaN, true and extra values as written) to /gradio_api/call/<api> and read the
    SSE answer: (event, data) with data the error line or the output list; (HTTP status, text) if refused."""
    import httpx

    r = httpx.post(f"{url}gradio_api/call/{api}", content=body, headers={"content-type": "application/json"},
                   timeout=30)
    if r.status_code != 200:
        return r.status_code, r.text
    text = httpx.get(f"{url}gradio_api/call/{api}/{r.json()['event_id']}", timeout=120).text
    event = [ln for ln in text.splitlines() if ln.startswith("event: ")][-1][7:]
    data = json.loads([ln for ln in text.splitlines() if ln.startswith("data: ")][-1][6:])
    return event, data["error"] if event == "error" else data


def _upload(url, name, data: bytes) -> str:
    import httpx

    r = httpx.post(f"{url}gradio_api/upload", files={"files": (name, data)}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()[0]


def _file_data(path):
    return {"path": path, "orig_name": Path(path).name, "meta": {"_type": "gradio.FileData"}}


def test_generate_over_the_api(served):
    studio, url, client = served
    guided, standard, status, download = client.predict(49, 2.5, 5, 4, 7, "DDIM", "minority guidance", 3.0, 3, 5,
                                                        api_name="/generate")
    assert len(guided) == 4 and len(standard) == 4
    assert status.startswith("Done") and download.endswith(".zip")
    assert all(float(item["caption"].split(" · ")[0]) > 0 for item in guided)


def test_same_seed_twice_identical_then_different(served):
    from PIL import Image

    _, _, client = served

    def images(seed):
        g = client.predict(49, 2.5, 5, 2, seed, "DDIM", "minority guidance", 3.0, 3, 5, 0, api_name="/generate")[0]
        return np.stack([np.asarray(Image.open(item["image"])) for item in g])

    a, b, c = images(5), images(5), images(6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_browse_over_the_api(served):
    _, _, client = served
    items, page, info = client.predict("most unique first", "all", 1, api_name="/browse")
    assert len(items) == 24 and page == 1 and "ranked by minority score" in info


@pytest.mark.parametrize("probe", ["/etc/passwd", "../../../../etc/passwd", "%2e%2e/%2e%2e/etc/passwd", "app.py",
                                   "assets/mri-atrophy/model.safetensors", "http://169.254.169.254/latest/meta-data/"])
def test_file_route_serves_no_server_path(served, probe):
    _, url, _ = served
    r = _get(f"{url}gradio_api/file={probe}")
    assert r.status_code in (403, 404), (probe, r.status_code)
    assert b"root:" not in r.content and b"safetensors" not in r.content[:64]


def test_generated_download_is_served(served):
    _, url, client = served
    download = client.predict(49, 2.5, 5, 1, 1, "DDIM", "minority guidance", 3.0, 3, 5, 0, api_name="/generate")[3]
    # the client fetched it from the server, so the route allowed it; the zip is what we wrote
    import zipfile

    assert "samples.csv" in zipfile.ZipFile(download).namelist()


def test_upload_over_max_file_size_is_refused(served):
    import httpx

    _, url, _ = served
    limit = int(MAX_FILE_SIZE.rstrip("mb")) * 1024 * 1024
    r = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.bin", b"0" * (2 * limit))}, timeout=30)
    assert r.status_code == 413


def test_bounded_queue_refuses_extra_requests_cleanly(served):
    _, _, client = served
    jobs = [client.submit(49, 2.5, 20, 4, s, "DDIM", "minority guidance", 3.0, 3, 5, 0, api_name="/generate") for s in range(6)]
    ok, errors = 0, []
    for j in jobs:
        try:
            j.result(timeout=300)
            ok += 1
        except Exception as e:  # noqa: BLE001 - gradio_client raises its own error types
            errors.append(f"{type(e).__name__}: {e}")
    assert ok >= 1 and errors and ok + len(errors) == 6, (ok, errors)
    assert all("queue" in e.lower() or "full" in e.lower() for e in errors), errors


def test_stop_freezes_the_sampler(served):
    studio, _, client = served
    job = client.submit(49, 2.5, 100, 16, 123, "DDIM", "minority guidance", 3.0, 3, 5, 0, api_name="/generate")
    t0 = time.time()
    while studio.steps_done == 0 or len(job.outputs()) == 0:
        assert time.time() - t0 < 60, "no preview within 60 s"
        time.sleep(0.05)
    before = studio.steps_done
    job.cancel()
    time.sleep(1.0)
    settled = studio.steps_done
    time.sleep(2.0)
    assert studio.steps_done == settled, "the sampler kept running after Stop"
    assert settled - before < 100  # it stopped well before the end of the run


def test_every_score_distance_has_a_name_in_words():
    """The header spells the bundle's distance out ("l2" in a code font read as "12"): no distance may be missing."""
    from app.ui import DISTANCE_NAMES
    from core.maths.score import DISTANCES

    assert set(DISTANCE_NAMES) == set(DISTANCES)


def test_too_few_inputs_get_one_readable_line(served):
    """Issue 16.8: Gradio's own answer listed Python object addresses; ours names the expected inputs."""
    import httpx

    _, url, _ = served
    call = url + "gradio_api/call/generate"
    r = httpx.post(call, json={"data": [49, 2.5]}, timeout=30)
    event = r.json()["event_id"]
    body = httpx.get(f"{call}/{event}", timeout=60).text
    assert "event: error" in body and "object at 0x" not in body, body
    msg = json.loads(body.split("data:", 1)[1].strip().splitlines()[0])["error"]
    assert msg.startswith("/generate needs 11 values (Minority class l, Guidance scale w") and msg.endswith("got 2")
    assert "optionally the browser's clock" in msg


def test_the_real_app_has_its_queue_bound_and_stop_wiring(monkeypatch):
    """Issue 16.12: what `python app.py` launches (not the test fixture's settings): a queue of QUEUE_SIZE and a
    Stop button that cancels the generate event."""
    import importlib.util
    from pathlib import Path

    import gradio as gr

    from app.ui import QUEUE_SIZE

    spec = importlib.util.spec_from_file_location("app_entry", Path(__file__).resolve().parent.parent / "app.py")
    app_module = importlib.util.module_from_spec(spec)  # app.py (the package app/ shadows its name)
    spec.loader.exec_module(app_module)

    seen = {}

    def fake_launch(self, **kw):
        seen.update(demo=self, **kw)

    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    monkeypatch.setattr(h.Studio, "warm", lambda self: self)
    assert app_module.main(["--bundle", str(h.DEFAULT_BUNDLE)]) == 0
    demo = seen["demo"]
    assert demo._queue.max_size == QUEUE_SIZE == 8 and seen["max_file_size"] == MAX_FILE_SIZE
    from gradio.route_utils import FnIndexInferError

    from app.ui import DELETE_CACHE

    assert demo.delete_cache == DELETE_CACHE == (600, 3600)  # unscored uploads are deleted within 70 minutes
    assert FnIndexInferError in seen["app_kwargs"]["exception_handlers"]  # an unknown API name is a 404
    config = demo.config
    stop_id = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "stop")
    gen = next(d for d in config["dependencies"] if d.get("api_name") == "generate")
    cancel = [d for d in config["dependencies"] if gen["id"] in (d.get("cancels") or [])]
    assert cancel and any(t[0] == stop_id for d in cancel for t in d["targets"]), cancel


def test_app_entry_skips_a_damaged_second_bundle_and_opens_the_good_one(monkeypatch, tmp_path, capsys):
    import importlib.util
    import shutil
    from pathlib import Path

    import gradio as gr

    spec = importlib.util.spec_from_file_location("app_entry", Path(__file__).resolve().parent.parent / "app.py")
    app_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app_module)
    bad = tmp_path / "bad"
    shutil.copytree(h.DEFAULT_BUNDLE, bad)
    (bad / "classifier.safetensors").write_bytes(b"not weights")
    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: seen.update(demo=self))
    monkeypatch.setattr(h.Studio, "warm", lambda self: self)
    assert app_module.main(["--bundle", str(h.DEFAULT_BUNDLE), "--bundle", str(bad)]) == 0
    err = capsys.readouterr().err
    assert f"bundle {bad} skipped" in err and "classifier.safetensors does not match" in err
    page = str(seen["demo"].config)
    assert "was skipped" in page and "mri-atrophy" in page
    assert app_module.main(["--bundle", str(bad)]) == 2  # nothing usable: one line, no server
    assert "no usable bundle" in capsys.readouterr().err


# ---- uploads and the cache (issue 24, part 2) -----------------------------------------------------------------
def test_score_image_refuses_a_download_it_did_not_receive(served):
    """Probe up_filedata_other_visitors_download: /score_image read, then deleted, any file of Gradio's cache the
    caller named (another visitor's download zip, given its hashed path). Now refused in one line; the zip stays."""
    _, url, _ = served
    event, out = _call(url, "generate", json.dumps({"data": GENERATE}))
    assert event == "complete"
    zip_path = out[3]["path"]
    assert zip_path.endswith(".zip") and os.path.isfile(zip_path)
    event, msg = _call(url, "score_image", json.dumps({"data": [_file_data(zip_path)]}))
    assert event == "error" and "\n" not in msg, msg
    assert msg == f"{Path(zip_path).name}: not a file uploaded to this tab; upload the file itself (only files " \
                  "sent with the upload are read)"
    assert os.path.isfile(zip_path) and _get(f"{url}gradio_api/file={zip_path}").status_code == 200


def test_score_image_reads_its_own_upload_and_leaves_nothing(served):
    """An upload is read (here refused by its content: scoring would cost the neighbour index ~10 s; the browser
    test scores one), then its file and its folder are gone, and no empty temp file is left beside them (Gradio's
    File left one tmpXXXXXXXX per scored upload: probe up_leftovers_per_upload); a replay is refused."""
    _, url, _ = served
    cache = Path(os.environ["GRADIO_TEMP_DIR"])
    empty_before = {f for f in cache.iterdir() if f.is_file() and f.stat().st_size == 0}
    path = _upload(url, "slice.png", b"not an image\n" * 10)
    assert Path(path).parent.parent == cache and os.path.isfile(path)
    event, msg = _call(url, "score_image", json.dumps({"data": [_file_data(path)]}))
    assert (event, msg) == ("error", "slice.png: not a PNG, JPEG or NIfTI file (judged by its content, not its name)")
    assert not os.path.exists(path) and not Path(path).parent.exists()
    assert {f for f in cache.iterdir() if f.is_file() and f.stat().st_size == 0} == empty_before
    event, msg = _call(url, "score_image", json.dumps({"data": [_file_data(path)]}))
    assert event == "error" and "not a file uploaded to this tab" in msg


@pytest.fixture(scope="module")
def short_cache():
    """The app with Gradio's cache cleaned every second of files older than a second (the real app: DELETE_CACHE)."""
    demo = build_ui(h.Studio(h.DEFAULT_BUNDLE), delete_cache=(1, 1))
    port = _free_port()
    launch(demo, queue_size=2, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_uploads_never_scored_are_deleted_on_schedule(short_cache):
    """Probe up_uploaded_never_scored_stays: a file sent to /gradio_api/upload and never scored stayed on disk."""
    path = _upload(short_cache, "parked.png", b"\x89PNG\r\n\x1a\n" + bytes(1000))
    assert os.path.isfile(path)
    t0 = time.time()
    while os.path.exists(path) and time.time() - t0 < 10:
        time.sleep(0.2)
    assert not os.path.exists(path), "the unscored upload was not deleted within 10 s"


@pytest.mark.parametrize("values, msg", [
    ('[NaN, 2.5, 5, 1, 1, "DDIM", "minority guidance", 3.0, 3, 5, 0]', "minority class l must be in [0, 49], got nan"),
    ('[49, 2.5, 5, 1, 1, "DDIM", "minority guidance", 3.0, 3, 5, NaN]', "range below l must be in [0, 10], got nan"),
    ('[49, true, 5, 1, 1, "DDIM", "minority guidance", 3.0, 3, 5, 0]', "scale w must be a number, got True"),
    ('[49, 2.5, 5, 1, 1.5, "DDIM", "minority guidance", 3.0, 3, 5, 0]',
     "seed must be a whole number in [0, 2147483647], got 1.5"),
    ('[49, 2.5, 5, 1, 1, "DDIM", "minority guidance", 3.0, 3, 5, 0, 1, 2, 3]', "/generate needs 11 values (Minority "
     "class l, Guidance scale w, Steps, Number of images, Seed, Sampler, Method, Boost gamma, Skip Δt, Self-guidance "
     "interval k, Range below l) and optionally the browser's clock (ms; 0: none); got 14"),
])
def test_generate_refuses_raw_json_values_by_name(served, values, msg):
    """Probes gen_l_nan, gen_spread_nan, gen_w_True, badapi seed=1.5, gen_too_many_values: refused (not coerced,
    rounded or ignored), one line naming the field."""
    _, url, _ = served
    assert _call(url, "generate", '{"data": %s}' % values) == ("error", msg)


def test_unknown_api_name_is_404(served):
    """Probe gen_unknown_bundle_api_name: Gradio's FnIndexInferError answered 500."""
    import httpx

    _, url, _ = served
    r = httpx.post(f"{url}gradio_api/call/generate_no_such_bundle", json={"data": [1]}, timeout=30)
    assert r.status_code == 404 and r.text.startswith("unknown API name"), (r.status_code, r.text)
