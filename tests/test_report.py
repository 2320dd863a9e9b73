"""to.report and ``trackin-ooc report``: one self-contained HTML file, checked in headless Chromium
(Debian's ``chromium``; scripts/install_chromium.sh): it renders, names its sections, requests nothing,
and a <script> in a training text is shown as text and runs nothing."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import trackin_ooc as to
from trackin_ooc.views import browser

from ._views_runs import SCRIPT_TEXT, digits_run, text_run

needs_chromium = pytest.mark.skipif(
    browser.find_chromium() is None, reason="no chromium binary on PATH (scripts/install_chromium.sh installs it)"
)
SECTIONS = {
    "how-to-read": "How to read this",
    "stores": "Stores",
    "suspects": "Suspects: the most self-influential training examples",
    "proponents": "Proponents and opponents of the first test examples",
    "net": "Most helpful and most harmful training examples for the whole test set",
    "checkpoints": "Each checkpoint's share of the scores",
    "distribution": "Score distribution",
}
# Anything that would make a browser fetch: src/href/srcset/poster/action/data attributes and CSS url() or
# @import with an http(s) or protocol-relative address.
REFERENCE = re.compile(
    r"""(?:\b(?:src|href|srcset|poster|action|data|xlink:href)\s*=\s*["']?\s*(?:https?:)?//)"""
    r"""|url\(\s*["']?\s*(?:https?:)?//|@import""",
    re.I,
)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return digits_run(tmp_path_factory.mktemp("report-digits"))


@pytest.fixture(scope="module")
def digits_report(digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("report-out") / "report.html"
    written = to.report(
        digits.test,
        digits.train,
        path,
        train_data=digits.train_data,
        test_data=digits.test_data,
        k=3,
        labels=digits.true_labels,
        progress=False,
    )
    return Path(written)


def test_report_is_one_self_contained_file(digits, digits_report):
    html = digits_report.read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert not REFERENCE.search(html), REFERENCE.search(html)
    assert "<script" not in html.lower() and "<link" not in html.lower() and "@font-face" not in html
    srcs = re.findall(r'src="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    for ident, title in SECTIONS.items():
        assert f'<section id="{ident}"><h2>{title.replace(chr(39), "&#x27;")}</h2>' in html
    # Suspects, proponents and the net-influence picks are the ones the public API gives.
    si = to.self_influence(digits.train, progress=False)
    suspects = re.findall(r'data-role="suspect">.*?<b>\d+\. #(\d+)</b>', html, flags=re.S)
    assert [int(s) for s in suspects] == np.argsort(-si.values, kind="stable")[:10].tolist()
    best = to.top_k(digits.test, digits.train, k=3, progress=False)
    pros = [int(p) for p in re.findall(r'data-role="proponent">.*?<b>\+\d #(\d+)</b>', html, flags=re.S)]
    assert pros == best.proponent_index.values[:5].reshape(-1).tolist()
    opps = [int(p) for p in re.findall(r'data-role="opponent">.*?<b>−\d #(\d+)</b>', html, flags=re.S)]
    assert opps == best.opponent_index.values[:5].reshape(-1).tolist()
    # Each checkpoint's share of self-influence: the exact norms the capture stored, weighted by η_c.
    sq = digits.train.read_sq_norms().astype(np.float64).sum(axis=1) * digits.train.learning_rates
    for name, share in zip(digits.train.checkpoint_names, sq / sq.sum()):
        assert re.search(
            rf"<td>{re.escape(name)}</td><td class=\"num\">[^<]*</td><td class=\"num\">{share:.1%}</td>", html
        )
    assert html.count("<svg") == 3  # checkpoint shares and two histograms, inline


@needs_chromium
def test_report_renders_in_chromium_and_requests_nothing(digits_report, tmp_path):
    seen = browser.visit(digits_report)
    for ident, title in SECTIONS.items():
        assert re.search(rf'<section id="{ident}"><h2>{re.escape(title)}</h2>', seen.dom.replace("&#x27;", "'"))
    assert "<title>trackin-ooc report</title>" in seen.dom
    assert seen.dom.count('data-role="proponent"') == 15
    assert seen.page_requests == []
    assert all(c.startswith("127.0.0.1:") for c in seen.connections), seen.connections
    shot = browser.screenshot(digits_report, tmp_path / "shot.png", width=1200, height=1600)
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("L"), dtype=np.float64)
    assert image.shape == (1600, 1200)
    ink = (image < 200).mean()
    assert 0.02 < ink < 0.9 and image.std() > 20  # text and pictures, not a blank or black page
    assert len(np.unique(image)) > 50


@needs_chromium
def test_the_request_check_sees_a_page_that_fetches(tmp_path):
    # The check above could fail: a page referring to loopback addresses is seen asking for them.
    probe = tmp_path / "probe.html"
    probe.write_text(
        '<!DOCTYPE html><html><head><link rel="stylesheet" href="http://127.0.0.1:9/a.css"></head>'
        '<body><img src="http://127.0.0.1:9/b.png"></body></html>'
    )
    assert REFERENCE.search(probe.read_text())
    seen = browser.visit(probe)
    assert seen.page_requests == ["http://127.0.0.1:9/a.css", "http://127.0.0.1:9/b.png"]
    # ... and this browser does run inline scripts: the report's escaping, not the browser, keeps them out.
    runs = tmp_path / "runs.html"
    runs.write_text(f"<!DOCTYPE html><html><head><title>before</title></head><body>{SCRIPT_TEXT}</body></html>")
    dom = browser.visit(runs).dom
    assert "<title>pwned</title>" in dom and "owned" in dom


@needs_chromium
def test_a_script_in_a_training_text_is_shown_and_runs_nothing(tmp_path):
    run = text_run(tmp_path / "run")
    out = to.report(
        run.test,
        run.train,
        tmp_path / "text.html",
        train_data=run.train_data,
        test_data=run.test_data,
        tokenizer=run.tokenizer,
        n_suspects=len(run.train_data),
        k=2,
        progress=False,
    )
    html = Path(out).read_text()
    assert SCRIPT_TEXT not in html and "&lt;script&gt;document.title=&#x27;pwned&#x27;" in html
    seen = browser.visit(out)
    assert "<title>trackin-ooc report</title>" in seen.dom and "pwned</title>" not in seen.dom
    assert 'id="how-to-read"' in seen.dom and ">owned<" not in seen.dom
    # The text is on the page as text: the DOM holds it escaped, inside the suspect's card.
    assert "&lt;script&gt;document.title='pwned';document.body.innerHTML='owned'&lt;/script&gt;" in seen.dom
    assert "&lt;img src=x onerror=" in seen.dom
    assert seen.dom.count("<script") == 0 and seen.dom.count("<img") == seen.dom.count('<img class="tko-img"')
    assert seen.page_requests == []


def test_report_follows_the_output_rule(digits, digits_report, tmp_path):
    with pytest.raises(to.StoreExistsError, match="overwrite=True"):
        to.report(digits.test, digits.train, digits_report)
    with pytest.raises(to.OutputOverlapsInputError):
        to.report(digits.test, digits.train, Path(digits.train.path) / "r.html")
    mine = tmp_path / "notes.html"
    mine.write_text("<html>my notes</html>")
    with pytest.raises(to.OutputKindError, match="not written by trackin-ooc"):
        to.report(digits.test, digits.train, mine, overwrite=True)
    assert mine.read_text() == "<html>my notes</html>"
    with pytest.raises(to.ViewError, match="end .* in .html"):
        to.report(digits.test, digits.train, tmp_path / "r.pdf")
    again = to.report(digits.test, digits.train, digits_report, overwrite=True, k=2, progress=False)
    assert Path(again) == digits_report and "(no data given)" in digits_report.read_text()


def _cli(*args, cwd):
    exe = Path(sys.executable).with_name("trackin-ooc")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_cli_report_with_the_real_executable(digits, tmp_path):
    data = tmp_path / "mydata.py"
    data.write_text(
        textwrap.dedent("""
        from torch.utils.data import Subset
        from trackin_ooc.demo import load_digits_split

        def train():
            return load_digits_split(n_train=240, flip_fraction=0.1, seed=0).train

        def test():
            return Subset(load_digits_split(n_train=240, flip_fraction=0.1, seed=0).test, range(40))
    """)
    )
    out = tmp_path / "out" / "report.html"
    args = [
        "report",
        "--train",
        digits.train.path,
        "--test",
        digits.test.path,
        "--train-data",
        f"{data}:train",
        "--test-data",
        f"{data}:test",
        "--out",
        str(out),
        "-k",
        "2",
    ]
    done = _cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"to {out}" in done.stdout
    html = out.read_text()
    assert html.count('data-role="proponent"') == 10 and len(re.findall(r'src="data:image/png', html)) > 20
    again = _cli(*args, cwd=tmp_path)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert again.stderr.strip().count("\n") == 0 and "already exists" in again.stderr
    usage = _cli("report", "--train", digits.train.path, "--out", str(out), cwd=tmp_path)
    assert usage.returncode == 2 and "--test" in usage.stderr
