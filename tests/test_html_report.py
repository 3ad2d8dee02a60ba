"""The HTML report (glad_jax.html_report): page content, offline assets, and a render in headless Chromium.

The browser test is skipped only when no Chromium is installed AND the CI variable is not set; in CI it runs
(.ci/run installs the Debian package `chromium`).
"""

import html.parser
import os
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from glad_jax import html_report

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
  env = os.environ.get("GLAD_CHROMIUM")
  if env:
    return env
  for name in CHROMIUM_NAMES:
    path = shutil.which(name)
    if path:
      return path
  return None


@pytest.fixture
def chromium():
  path = find_chromium()
  if path is None:
    if os.environ.get("CI"):
      pytest.fail(f"CI is set but no Chromium was found (looked for {', '.join(CHROMIUM_NAMES)} and $GLAD_CHROMIUM)")
    pytest.skip("no Chromium installed (apt-get install -y chromium); runs in CI")
  return path


def run_chromium(binary: str, tmp: pathlib.Path, page: pathlib.Path, *extra: str) -> str:
  flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'chromium-profile'}"]
  proc = subprocess.run([binary, *flags, *extra, page.resolve().as_uri()], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout


def synthetic_eval(n: int = 8, size: int = 48):
  """Images, labels, maps (a hot square on the anomalous ones) and matching ground truth."""
  rng = np.random.default_rng(0)
  images = rng.integers(60, 200, (n, size, size, 3), dtype=np.uint8)
  labels = np.arange(n) % 2 == 1
  maps = rng.normal(0.0, 0.3, (n, size, size)).astype(np.float32)
  masks = np.zeros((n, size, size), bool)
  for i in np.flatnonzero(labels):
    masks[i, 10:20, 12:24] = True
    maps[i][masks[i]] += 3.0 + i
  scores = maps.reshape(n, -1).max(axis=1)
  return images, labels, maps, masks, scores


def write_report(out: pathlib.Path, **kw) -> pathlib.Path:
  images, labels, maps, masks, scores = synthetic_eval()
  out.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(out / "weight_decay.png")
  args = dict(image_scores=scores, labels=labels, anomaly_maps=maps, images=images, masks=masks,
              names=[f"{'bad' if y else 'good'}/{i:03d}.png" for i, y in enumerate(labels)],
              image_threshold=1.5, pixel_threshold=1.0, good_score_median=1.0,
              figures=[out / "weight_decay.png"], notes=["synthetic test <data>"])
  args.update(kw)
  return html_report.write_html_report(out, "GLAD report: synthetic & co", {"image_auroc": 1.0, "n_test": 8},
                                       **args)


class _Collector(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.imgs, self.ids, self.text = [], [], []

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    if tag == "img":
      self.imgs.append(a)
    if "id" in a:
      self.ids.append(a["id"])

  def handle_data(self, data):
    self.text.append(data)


def parse(page: str) -> _Collector:
  c = _Collector()
  c.feed(page)
  return c


def test_page_content_offline_assets_and_gallery_order(tmp_path):
  path = write_report(tmp_path / "rep")
  assert path == tmp_path / "rep" / "index.html"
  page = path.read_text()
  doc = parse(page)
  assert "<title>GLAD report: synthetic &amp; co</title>" in page
  assert "synthetic test &lt;data&gt;" in page  # text is escaped
  assert {"metrics", "figures", "gallery"} <= set(doc.ids)
  assert re.search(r"<td>image_auroc</td><td class=\"num\">1.0000</td>", page)
  assert re.search(r"<td>image threshold</td><td class=\"num\">1.5000</td>", page)
  # Offline: nothing fetched from anywhere, every picture is a relative path to a PNG that exists.
  assert not re.search(r"(src|href)=\"(https?:)?//", page)
  srcs = [img["src"] for img in doc.imgs]
  assert all((path.parent / s).is_file() and s.endswith(".png") for s in srcs)
  assert {"html/roc.png", "html/pro.png", "html/score_histogram.png", "weight_decay.png"} <= set(srcs)
  # 8 images x (image, heat map, truth, regions).
  assert sum(s.startswith("html/gallery/") for s in srcs) == 32
  # Gallery sorted by score, most anomalous first: the names appear in that order.
  _, labels, _, _, scores = synthetic_eval()
  expected = [f"{'bad' if labels[i] else 'good'}/{i:03d}.png" for i in np.argsort(-scores)]
  assert [t for t in doc.text if t.endswith(".png")] == expected


def test_gallery_cap_keeps_the_top_and_bottom(tmp_path):
  path = write_report(tmp_path / "rep", max_gallery=3)
  page = path.read_text()
  assert "showing the 2 highest and the 1 lowest scores of 8 images" in page
  ranks = re.findall(r"<tr><td class=\"num\">(\d+)</td>", page)
  assert ranks == ["1", "2", "8"]


def test_report_without_ground_truth_or_thresholds(tmp_path):
  images, labels, maps, _, scores = synthetic_eval()
  path = html_report.write_html_report(tmp_path / "r", "no truth", {"image_auroc": 0.5}, image_scores=scores,
                                       anomaly_maps=maps, images=images)
  srcs = [img["src"] for img in parse(path.read_text()).imgs]
  assert "html/pro.png" not in srcs and "html/roc.png" not in srcs
  assert sum(s.startswith("html/gallery/") for s in srcs) == 16  # image + heat map only


def test_names_length_is_checked(tmp_path):
  with pytest.raises(ValueError, match=r"names \(2\) and labels \(None\) should have one entry per image score \(3\)"):
    html_report.write_html_report(tmp_path, "x", {}, image_scores=[1.0, 2.0, 3.0], names=["a", "b"])


def test_page_renders_in_headless_chromium(tmp_path, chromium):
  path = write_report(tmp_path / "rep")
  n_imgs = len(parse(path.read_text()).imgs)
  dom = run_chromium(chromium, tmp_path, path, "--virtual-time-budget=10000", "--dump-dom")
  doc = parse(dom)
  assert 'data-ready="1"' in dom, dom[-2000:]  # the load event fired
  assert "GLAD report: synthetic &amp; co" in dom and "metrics" in doc.ids
  assert "image_auroc" in dom
  assert len(doc.imgs) == n_imgs == 3 + 1 + 32
  assert [img.get("data-loaded") for img in doc.imgs] == ["1"] * n_imgs  # each decoded, naturalWidth > 0
  shot = tmp_path / "shot.png"
  run_chromium(chromium, tmp_path, path, "--window-size=1280,2000", f"--screenshot={shot}",
               "--virtual-time-budget=10000")
  pixels = np.asarray(Image.open(shot).convert("RGB"))
  assert pixels.shape[:2] == (2000, 1280)
  assert pixels.std() > 10  # not a blank page


def test_browser_check_detects_a_missing_image(tmp_path, chromium):
  """The load-status check can fail: a report whose PNG was deleted shows data-loaded="0" for it."""
  path = write_report(tmp_path / "rep")
  (path.parent / "html" / "roc.png").unlink()
  dom = run_chromium(chromium, tmp_path, path, "--virtual-time-budget=10000", "--dump-dom")
  states = {img["src"]: img.get("data-loaded") for img in parse(dom).imgs}
  assert states["html/roc.png"] == "0"
  assert sum(v == "1" for v in states.values()) == len(states) - 1
