"""The page in a real browser: Debian's headless Chromium, driven by Playwright, against a real
uvicorn server on a free loopback port; it uploads a chest X-ray and sees the answer."""

from __future__ import annotations

import socket
import threading
import time
from importlib import resources
from pathlib import Path

import pytest

from cxrlab.config import RunConfig
from cxrlab.deploy.predict import predict_paths
from cxrlab.training.lifecycle import train_run
from tests.conftest import make_kermany_folder

CHROMIUM = Path("/usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not CHROMIUM.exists():
    pytest.skip("no /usr/bin/chromium (apt-get install -y chromium)", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    from cxrlab.deploy.serve import create_app

    root = tmp_path_factory.mktemp("browser")
    data = make_kermany_folder(root / "data", 8, 8, size=48)
    cfg = RunConfig(data=str(data), model="cnn", image_size=64, epochs=1, batch_size=8)
    train_run(cfg, root / "run", progress=False)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(root / "run"), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", root / "run"
    srv.should_exit = True
    thread.join(timeout=10)


def chest_xray() -> Path:
    """A real X-ray that ships with cxrlab (the demo data's held-out test set)."""
    demo = Path(str(resources.files("cxrlab") / "demo_data" / "test" / "PNEUMONIA"))
    return sorted(demo.glob("*.jpeg"))[0]


def test_page_uploads_an_xray_and_shows_class_and_heatmap(server):
    url, run = server
    xray = chest_xray()
    row = predict_paths(run, [xray])[0]
    expected = row["class"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--no-sandbox"])
        try:
            page = browser.new_page()
            external = []
            page.on("request", lambda r: external.append(r.url)
                    if not r.url.startswith((url, "data:")) else None)
            page.goto(url + "/")
            sync_api.expect(page.locator("#meta")).to_contain_text("cnn")
            page.set_input_files("#file", str(xray))
            sync_api.expect(page.locator("#pred-class")).to_have_text(expected, timeout=30_000)
            sync_api.expect(page.locator("#probs .bar")).to_have_count(2)
            # the decision with its rule, as `cxrlab predict` shows it
            sync_api.expect(page.locator("#rule")).to_have_text(f"because {row['rule']}")
            sync_api.expect(page.locator("#threshold")).to_contain_text(
                f"{row['threshold']:.3f}")
            sync_api.expect(page.locator("#research")).to_have_text(
                "Research use only — not for clinical use.")
            cam = page.locator("#cam")
            assert cam.get_attribute("src").startswith("data:image/png;base64,")
            page.wait_for_function("document.getElementById('cam').naturalWidth > 0")
            assert page.evaluate("document.getElementById('cam').naturalWidth") == 64
            assert page.locator("#error").inner_text() == ""
            # a file that is not an image: the page shows the service's reason
            page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain",
                                                  "buffer": b"not an x-ray" * 10}])
            sync_api.expect(page.locator("#error")).to_contain_text("415")
            assert external == []  # self-contained: nothing fetched from elsewhere
        finally:
            browser.close()
