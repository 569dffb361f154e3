#!/usr/bin/env python3
"""Screenshots of every HTML page kind for the docs (docs/img/), taken by the browser tests' driver.

    python scripts/screenshots.py               # real audits of the shipped examples (a few minutes on 2 cores)
    python scripts/screenshots.py --keep DIR    # also keep the pages and documents in DIR
    python scripts/screenshots.py --only replay # one page kind (and its pictures)

Each page comes from real commands: the recommender example audited with
``--run-check`` (at 2 threads, and at 1 thread, where its accumulation races cannot
happen: the diff of the two), the shipped CPU catalog converted with ``opaudit catalog
--from``, the recommender predicted against it with ``--against``, and the decoder
example's ``--batch-invariance`` check, and the tiny transformer of the capsule tests
captured under ATen's AVX2 kernels and replayed under its scalar ones (the two
settings of one CPU that ``docs/migrate.md`` shows), and the two traces of the tiny language
model under those two settings compared (``docs/compare.md``). Headless Chromium (Debian's ``chromium`` and
``chromium-driver``) draws them at 1280 pixels wide.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from fixtures import browser  # noqa: E402

CATALOG = os.path.join("catalogs", "cpu-x86_64-torch2.13.0.yaml")
RECOMMENDER = os.path.join("opaudit", "examples", "recommender.py")


def opaudit(*args: str, cwd: str = ROOT, capability: str = "") -> None:
    """The real CLI, from the repository root (so that the pages show the paths a user sees); ``capability``: the
    ``ATEN_CPU_CAPABILITY`` it runs under."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    print(f"$ {f'ATEN_CPU_CAPABILITY={capability} ' if capability else ''}opaudit " + " ".join(args), flush=True)
    proc = subprocess.run([sys.executable, "-m", "opaudit", *args], cwd=cwd, stdout=subprocess.DEVNULL, env=env)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"opaudit {' '.join(args)} exited {proc.returncode}")


SECTIONS = {"report": ("step", "cost", "divergence", "run-check"), "catalog": ("grid",), "replay": ("magnitude",),
            "compare": ("cause",)}
"""The parts of a page shot on their own (the pictures), by the page's section ids."""
KINDS = ("report", "catalog", "diff", "prediction", "batch", "replay", "compare")
TRANSFORMER = os.path.join("tests", "fixtures", "scripts", "tiny_transformer.py")


def make_pages(folder: str, only: Sequence[str] = KINDS) -> dict[str, str]:
    """Run the commands of the page kinds in ``only``; the HTML pages by name."""
    p = {name: os.path.join(folder, f"{name}.html") for name in only}
    if "report" in only:
        opaudit(RECOMMENDER, "--run-check", "-q", "--format", "html", "-o", p["report"])
    if "diff" in only:
        opaudit(RECOMMENDER, "--run-check", "-q", "-o", os.path.join(folder, "two-threads.yaml"))
        opaudit(RECOMMENDER, "--threads", "1", "-q", "-o", os.path.join(folder, "one-thread.yaml"))
        opaudit("diff", "two-threads.yaml", "one-thread.yaml", "-q", "-o", p["diff"], cwd=folder)
    if "catalog" in only:
        opaudit("catalog", "--from", CATALOG, "-q", "-o", p["catalog"])
    if "prediction" in only:
        opaudit(RECOMMENDER, "--against", CATALOG, "-q", "-o", p["prediction"])
    if "batch" in only:
        opaudit(os.path.join("opaudit", "examples", "decoder.py"), "--batch-invariance", "-q", "-o", p["batch"])
    if "replay" in only:
        capsule = os.path.join(folder, "step.opcap")
        opaudit("capture", TRANSFORMER, "-q", "-o", capsule, capability="avx2")
        # From the capsule's folder, so that the page names it as the user's own replay would: step.opcap.
        opaudit("replay", "step.opcap", "-q", "-o", p["replay"], cwd=folder, capability="default")
    if "compare" in only:
        lm = os.path.join("tests", "fixtures", "trace", "tiny_lm.py")
        opaudit("trace", lm, "-q", "-o", os.path.join(folder, "avx2.optrace"), capability="avx2")
        opaudit("trace", lm, "-q", "-o", os.path.join(folder, "default.optrace"), capability="default")
        opaudit("compare", "avx2.optrace", "default.optrace", "-q", "-o", p["compare"], cwd=folder)
    return p


def shoot(pages: dict[str, str], out: str) -> list[str]:
    """Screenshots of each page (and of the report's pictures); the files written."""
    written = []

    def save(driver, name: str, element=None) -> None:
        path = os.path.join(out, f"{name}.png")
        if element is None:
            driver.save_screenshot(path)
        else:
            element.screenshot(path)
        written.append(path)
        print(f"  {os.path.relpath(path, ROOT)}")

    with browser.chromium(1280, 860) as driver:
        for name, page in pages.items():
            driver.get(browser.file_url(page))
            errors = browser.console_errors(driver)
            if errors:
                raise SystemExit(f"{page}: console errors: {errors}")
            rows = driver.find_elements("css selector", "table.data.main > tbody > tr:first-child")
            if name in ("report", "prediction", "catalog", "replay", "compare") and rows:
                rows[0].click()  # a row opened to its detail
            save(driver, name)
            for section in SECTIONS.get(name, ()):
                save(driver, f"{name}-{section}", driver.find_element("id", section))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "img"), help="folder of the PNG files")
    p.add_argument("--keep", metavar="DIR", help="make the pages in DIR and keep them")
    p.add_argument("--only", metavar="KIND", action="append", choices=KINDS,
                   help=f"only this page kind (repeatable; {', '.join(KINDS)})")
    args = p.parse_args(argv)
    why = browser.missing()
    if why:
        raise SystemExit(f"no browser: {why}")
    folder = args.keep or tempfile.mkdtemp(prefix="opaudit-shots-")
    os.makedirs(folder, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    try:
        shoot(make_pages(folder, args.only or KINDS), args.out)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
