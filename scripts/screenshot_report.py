"""Screenshot a run report in a real browser: headless Chromium renders ``<run_dir>/report/index.html`` from disk.

    python scripts/screenshot_report.py runs/demo docs/report_screenshot.png
    python scripts/screenshot_report.py runs/demo /tmp/report.png --window-size 1280,3600 --rebuild

Needs Chromium (Debian: ``apt-get install -y chromium``; ``--chromium`` or ``$CHROMIUM`` names another binary).
Before the screenshot the page is checked with ``embtune.pipeline.report.check_report`` (every image and link resolves,
each PNG decodes), so a screenshot is never taken of a broken page. The PNG is re-encoded as an optimized palette
image when it is larger than ``--max-bytes`` (for committing it under docs/).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's embtune, whatever the install
from embtune.pipeline.report import REPORT_DIR, build_report, check_report  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium(explicit: str | None) -> str:
    for name in ([explicit] if explicit else []) + [os.environ.get("CHROMIUM", "")] + list(BROWSERS):
        if name and shutil.which(name):
            return shutil.which(name)
    sys.exit("no Chromium found: install it (Debian: apt-get install -y chromium) or pass --chromium PATH")


def screenshot(page: Path, out: Path, chromium: str, window_size: str, timeout: float = 120) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [chromium, "--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--no-default-browser-check", f"--user-data-dir={profile}", f"--window-size={window_size}",
               f"--screenshot={out.resolve()}", page.resolve().as_uri()]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.insert(1, "--no-sandbox")  # Chromium refuses to start its sandbox as root (containers, CI)
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0 or not out.is_file():
        sys.exit(f"chromium failed (exit {result.returncode}):\n{result.stderr[-2000:]}")


def shrink(path: Path, max_bytes: int) -> None:
    """Re-encode as a 256-colour optimized PNG when the screenshot is over ``max_bytes`` (text and plots keep)."""
    from PIL import Image

    if path.stat().st_size <= max_bytes:
        return
    with Image.open(path) as image:
        image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a pipeline run directory")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--window-size", default="1280,2400", help="WIDTH,HEIGHT of the browser window in pixels")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the report from the stage outputs first")
    parser.add_argument("--chromium", help="the browser binary (default: chromium on PATH)")
    parser.add_argument("--max-bytes", type=int, default=1_000_000, help="re-encode the PNG when larger")
    args = parser.parse_args(argv)

    page = args.run_dir / REPORT_DIR / "index.html"
    if args.rebuild or not page.is_file():
        page = build_report(args.run_dir)
    problems = check_report(page)
    if problems:
        sys.exit("the report is broken:\n" + "\n".join(problems))
    screenshot(page, args.out, find_chromium(args.chromium), args.window_size)
    shrink(args.out, args.max_bytes)
    print(f"{args.out}: {args.out.stat().st_size:,} bytes, {page} rendered by {find_chromium(args.chromium)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
