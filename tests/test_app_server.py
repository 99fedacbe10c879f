"""The app served over HTTP (issue 5): gradio_client API calls and the public-Space safety probes of
TESTING.md (paths, upload size, bounded queue, Stop)."""
import json
import os
import socket
import time

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
from gradio_client import Client  # noqa: E402

from app import handlers as h  # noqa: E402
from app.ui import MAX_FILE_SIZE, build_ui, launch  # noqa: E402


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
