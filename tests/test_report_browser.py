"""`ddpo report`'s page in a real browser (headless Chromium): every image loads, the page shows the run's key
figures, and a screenshot is saved to the test's temporary folder."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess

import pytest
from PIL import Image

from ddpo.cli import main
from ddpo.training.runlog import read_jsonl


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Chromium is missing under CI=true: .ci/run installs it (apt-get install chromium)")
        pytest.skip("Chromium is not installed (apt-get install chromium); under CI=true this test fails instead")
    return path


HARNESS = """<!doctype html><html><body>
<iframe id="page" src="{src}" style="width:1400px;height:900px"></iframe>
<script>
document.getElementById("page").onload = () => {{
  const doc = document.getElementById("page").contentDocument;
  const images = [...doc.images].map(i => ({{src: i.getAttribute("src"), loaded: i.complete && i.naturalWidth > 0,
                                           width: i.naturalWidth}}));
  const out = document.createElement("pre");
  out.id = "result";
  out.textContent = JSON.stringify({{images: images, text: doc.body.innerText, title: doc.title}});
  document.body.appendChild(out);
}};
</script></body></html>"""

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--allow-file-access-from-files"]


def test_report_page_renders_in_chromium(fast_overrides, tmp_path):
    browser = chromium()
    assert main(["train", "--preset", "tiny", "num_epochs=2", *fast_overrides]) == 0
    run = tmp_path / "runs" / "run"
    assert main(["report", str(run), "--prompt", "a cat", "--seeds", "0"]) == 0
    index = run / "report" / "index.html"
    harness = run / "report" / "harness.html"
    harness.write_text(HARNESS.format(src=index.name))
    profile = tmp_path / "profile"
    result = render(browser, harness, profile)
    names = sorted(image["src"] for image in result["images"])
    assert names == ["before_after.png", "diagnostics.png", "rewards.png", "samples_across_epochs.png"]
    broken = [image["src"] for image in result["images"] if not image["loaded"]]
    assert not broken, f"images that did not load: {broken}"
    # The run's key figures: its directory, the last epoch's reward and step count, the config's reward name.
    last = read_jsonl(run / "metrics.jsonl")[-1]
    text = result["text"]
    assert result["title"] == "ddpo run run"
    assert str(run.resolve()) in text
    assert f"{last['reward_mean']:.6g}" in text and f"{last['global_step']:.6g}" in text
    assert "jpeg_compressibility" in text
    # And a screenshot of the page itself, kept in the test's folder.
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            browser,
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--screenshot={shot}",
            "--window-size=1400,2400",
            "--virtual-time-budget=15000",
            index.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    with Image.open(shot) as image:
        assert image.size == (1400, 2400)
        colours = image.convert("L").getextrema()
    assert colours[0] < colours[1]  # not a blank page
    # The check sees a missing image (so it can fail).
    (run / "report" / "rewards.png").unlink()
    assert [i["src"] for i in render(browser, harness, profile)["images"] if not i["loaded"]] == ["rewards.png"]


def render(browser: str, harness, profile) -> dict:
    """Load the harness page (the report in an iframe) and return what its script found."""
    dom = subprocess.run(
        [browser, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--dump-dom", harness.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r'<pre id="result">(.*?)</pre>', dom.stdout, re.S)
    assert found, f"the page did not report back; chromium said: {dom.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))
