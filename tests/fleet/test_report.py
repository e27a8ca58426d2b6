"""`edgefleet report`: PNGs that decode at the expected size, an HTML page that holds each of them, failures
and drop-outs shown, and the page looked at in a real browser (headless Chromium from Debian)."""
from __future__ import annotations

import base64
import shutil
import subprocess

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from fleet.cli import main  # noqa: E402
from fleet.report import FIGSIZE_IN, PLOT_FRAME, PLOTS, PNG_SIZE, load_run, plot_failures, write_report  # noqa: E402
from tests.fleet.round_logs import round_logs, write_run_dir  # noqa: E402

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--force-device-scale-factor=1",
                  "--hide-scrollbars", "--force-color-profile=srgb")
FRAME_PX = 4


def test_report_pngs_and_page(tmp_path):
    write_run_dir(tmp_path / "run", round_logs(12, 3), 12, 3)
    assert main(["report", str(tmp_path / "run"), "-o", str(tmp_path / "out")]) == 0
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert [p.stem for p in pngs] == sorted(name for name, _, _ in PLOTS)
    page = (tmp_path / "out" / "index.html").read_text()
    for path in pngs:
        image = mpimg.imread(path)
        assert image.shape[:2] == (PNG_SIZE[1], PNG_SIZE[0]), path.name
        assert image[..., :3].std() > 0.05, f"{path.name} is blank"
        assert f'data-file="{path.name}"' in page and f'href="{path.name}"' in page
        assert base64.b64encode(path.read_bytes()).decode() in page  # self-contained: the image itself is in the page
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_report_shows_failures_and_dropouts(tmp_path):
    logs = round_logs(12, 3)
    write_run_dir(tmp_path / "run", logs, 12, 3)
    run = load_run(tmp_path / "run")
    fig = plt.figure(figsize=FIGSIZE_IN)
    plot_failures(run, fig)
    ax = fig.axes[0]
    drawn = {}
    for container, label in zip(ax.containers, ax.get_legend_handles_labels()[1]):
        drawn[label] = [int(bar.get_height()) for bar in container]
    plt.close(fig)
    expected = {}
    for i, log in enumerate(logs):
        for cause, count in {**log.failures, **log.unavailable}.items():
            expected.setdefault(cause, [0] * len(logs))[i] = count
    assert drawn == expected and {"dropout", "offline", "error", "straggler"} <= set(drawn)
    page = write_report(tmp_path / "run").html.read_text()
    assert "dropout 1" in page and "error 1" in page and "straggler 1" in page


def test_report_of_a_live_run(tmp_path):
    write_run_dir(tmp_path / "run", round_logs(6, 4)[:2], 6, 4, finished=False)
    report = write_report(tmp_path / "run")
    assert len(report.pngs) == len(PLOTS) and all(p.exists() for p in report.pngs)
    assert "(running)" in report.html.read_text()


def test_chromium_shows_every_plot(tmp_path):
    write_run_dir(tmp_path / "run", round_logs(12, 3), 12, 3)
    report = write_report(tmp_path / "run")
    shot = tmp_path / "shot.png"
    height = 600 + (PNG_SIZE[1] + 80) * len(PLOTS)
    subprocess.run([shutil.which("chromium"), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                    f"--window-size={PNG_SIZE[0] + 200},{height}", f"--screenshot={shot}", report.html.as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = (mpimg.imread(shot)[..., :3] * 255).round().astype(int)
    frame_rgb = [int(PLOT_FRAME[i:i + 2], 16) for i in (1, 3, 5)]
    labels, count = ndimage.label(np.all(pixels == frame_rgb, axis=-1))
    frames = []
    for region in ndimage.find_objects(labels):
        h, w = region[0].stop - region[0].start, region[1].stop - region[1].start
        if (h, w) == (PNG_SIZE[1] + 2 * FRAME_PX, PNG_SIZE[0] + 2 * FRAME_PX):
            frames.append(region)
    assert len(frames) == len(PLOTS), f"found {len(frames)} framed plots of {count} regions"
    for region in frames:  # inside each frame: a drawn plot (axes, text, coloured data), not a blank box
        inside = pixels[region[0].start + FRAME_PX:region[0].stop - FRAME_PX,
                        region[1].start + FRAME_PX:region[1].stop - FRAME_PX]
        not_white = np.any(inside < 240, axis=-1).mean()
        coloured = (inside.max(axis=-1) - inside.min(axis=-1) > 60).mean()
        assert not_white > 0.02 and coloured > 0.005, (region, not_white, coloured)
