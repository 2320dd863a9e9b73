"""to.show on real runs: digits pictures, decoded text from a Hugging Face tokenizer, wine table rows,
a user's render function; labels as stored and as given; saving .html and .png under the output rule."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

import trackin_ooc as to
from trackin_ooc.views import ViewError, kind_of

from ._views_runs import IMG_TEXT, SCRIPT_TEXT, digits_run, text_run, wine_run

PNG_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return digits_run(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    return text_run(tmp_path_factory.mktemp("texts"))


@pytest.fixture(scope="module")
def wine(tmp_path_factory):
    return wine_run(tmp_path_factory.mktemp("wine"))


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return w, h


def _png_pixels(data: bytes) -> np.ndarray:
    """Decode a grayscale 8-bit PNG written with filter 0 (what the views write)."""
    w, h = _png_size(data)
    idat = b""
    pos = 8
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + n]
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, w + 1)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:]


def _cards(html: str, role: str) -> list[str]:
    return re.findall(rf'<div class="tko-card [^"]*" data-role="{role}">(.*?)</div></div>', html, flags=re.S)


# ---- pictures ----------------------------------------------------------------------------------
def test_top_k_view_embeds_each_test_example_with_its_proponents_and_opponents(digits):
    best = to.top_k(digits.test, digits.train, k=4, progress=False)
    view = to.show(best, digits.train_data, digits.test_data, n=3, k=3)
    html = view._repr_html_()
    pictures = PNG_URI.findall(html)
    assert len(pictures) == 3 * (1 + 2 * 3)
    # The first picture is test example 0, enlarged by whole pixels from its 8 x 8 digit.
    pixels = _png_pixels(base64.b64decode(pictures[0]))
    assert pixels.shape[0] % 8 == 0 and pixels.shape[0] >= 96
    f = pixels.shape[0] // 8
    image = digits.test_data[0][0].numpy()[0]
    np.testing.assert_array_equal(pixels[::f, ::f], np.rint(image * 255).astype(np.uint8))
    # The proponents shown are top_k's, in rank order, with the store's labels and the scores.
    labels = digits.train.labels()
    pros = _cards(html, "proponent")
    assert len(pros) == 9 and len(_cards(html, "opponent")) == 9 and len(_cards(html, "test")) == 3
    for t in range(3):
        for j in range(3):
            idx = int(best.proponent_index.values[t, j])
            card = pros[3 * t + j]
            assert f"+{j + 1} #{idx}<" in card
            assert f"label {labels[idx]}" in card
            assert f"score {float(best.proponent_score.values[t, j]):.3g}" in card
    assert "test #0<" in html and f"label {digits.test.labels()[0]}" in _cards(html, "test")[0]


def test_suspects_show_stored_labels_and_mark_the_true_ones_that_differ(digits):
    si = to.self_influence(digits.train, progress=False)
    view = to.show(si, digits.train_data, n=20, labels=digits.true_labels)
    html = view._repr_html_()
    order = np.argsort(-si.values, kind="stable")[:20]
    cards = _cards(html, "suspect")
    assert len(cards) == 20
    stored, true = digits.train.labels(), digits.true_labels
    for rank, (card, row) in enumerate(zip(cards, order)):
        assert f"{rank + 1}. #{row}<" in card
        assert f"label {stored[row]}" in card
        assert ("tko-bad" in card) == (stored[row] != true[row])
    flipped_shown = int((stored[order] != true[order]).sum())
    assert html.count('class="tko-bad"') == flipped_shown
    assert flipped_shown > 0  # the digits run flips 10 % of the labels; the top 20 hold some


def test_net_influence_view_shows_most_helpful_and_most_harmful(digits):
    net = to.net_influence(digits.test, digits.train, progress=False)
    view = to.show(net, digits.train_data, n=4)
    html = view._repr_html_()
    order = np.argsort(-net.values, kind="stable")
    helpful, harmful = _cards(html, "helpful"), _cards(html, "harmful")
    assert [int(re.search(r"#(\d+)<", c).group(1)) for c in helpful] == order[:4].tolist()
    assert [int(re.search(r"#(\d+)<", c).group(1)) for c in harmful] == order[::-1][:4].tolist()
    grouped = to.net_influence(digits.test, digits.train, by="label", progress=False)
    g_view = to.show(grouped, digits.train_data, n=2, k=3)
    assert len(g_view.rows) == 2 and len(_cards(g_view._repr_html_(), "helpful")) == 6


def test_without_data_the_view_still_shows_ids_labels_and_scores(digits):
    best = to.top_k(digits.test, digits.train, k=2, progress=False)
    html = to.show(best, None, n=1)._repr_html_()
    assert "data:image/png" not in html
    assert html.count("(no data given)") == 5
    assert f"#{int(best.proponent_index.values[0, 0])}<" in html


# ---- text --------------------------------------------------------------------------------------
def test_token_ids_are_decoded_text_and_stay_text(texts):
    si = to.self_influence(texts.train, progress=False)
    view = to.show(si, texts.train_data, n=len(texts.train_data), tokenizer=texts.tokenizer)
    html = view._repr_html_()
    for i in (0, 1, 7):
        assert texts.extra["texts"][i] in html  # word-level: decoding gives the sentence back
    assert "<script>document" not in html and "<img src=x" not in html
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;" in html
    assert "&lt;img src=x onerror=" in html
    assert SCRIPT_TEXT not in html and IMG_TEXT not in html
    # render= accepts the tokenizer too, and test examples are decoded beside their proponents.
    best = to.top_k(texts.test, texts.train, k=2, progress=False)
    html = to.show(best, texts.train_data, texts.test_data, n=2, render=texts.tokenizer)._repr_html_()
    assert texts.extra["test_texts"][0] in html and texts.extra["test_texts"][1] in html
    assert "[PAD]" not in html  # the attention mask drops the padding


def test_token_weights_highlight_tokens(texts):
    si = to.self_influence(texts.train, progress=False)
    row = int(np.argmax(si.values))
    n_tokens = int(texts.train_data[row]["attention_mask"].sum())
    weights = {row: np.r_[np.arange(1, n_tokens + 1, dtype=float), np.zeros(12 - n_tokens)]}
    html = to.show(si, texts.train_data, n=1, tokenizer=texts.tokenizer, token_weights={"train": weights})._repr_html_()
    alphas = [float(a) for a in re.findall(r"background:rgba\(255,140,0,([0-9.]+)\)", html)]
    assert len(alphas) == n_tokens and alphas[-1] == 1.0 and alphas == sorted(alphas)


# ---- tables ------------------------------------------------------------------------------------
def test_tabular_rows_are_tables_with_feature_names(wine):
    best = to.top_k(wine.test, wine.train, k=2, progress=False)
    names = wine.extra["feature_names"]
    html = to.show(best, wine.train_data, wine.test_data, n=2, columns=names)._repr_html_()
    assert "data:image/png" not in html
    assert html.count("<th>") == 0 and html.count(f"<td>{names[0]}</td>") == 2 * (1 + 2 * 2)
    x0 = float(wine.test_data[0][0][0])
    assert f'<td class="num">{x0:.4g}</td>' in html
    with pytest.raises(ViewError, match="columns has 2 names"):
        to.show(best, wine.train_data, wine.test_data, columns=names[:2])


def test_flat_vectors_are_pictures_only_when_they_look_like_pixels():
    digit = np.linspace(0, 16, 64).round()  # whole numbers in 0..255: an 8 x 8 picture
    assert kind_of(digit) == "image"
    assert kind_of(np.linspace(-1, 1, 64)) == "table"  # negative values: features, not pixels
    assert kind_of(np.linspace(0, 1, 60)) == "table"  # not a square
    assert kind_of(np.arange(64)) == "table"  # integer ids or counts, not pixels (uint8 would be)
    assert kind_of(np.arange(64, dtype=np.uint8)) == "image"
    assert kind_of(np.zeros((3, 32, 32), np.float32)) == "image" and kind_of(np.zeros((28, 28))) == "image"
    assert kind_of(np.arange(5)) == "table" and kind_of(np.arange(5), tokenizer=object()) == "tokens"
    assert kind_of("some text") == "text" and kind_of({"age": 3, "city": "x"}) == "table"


def test_render_function_for_anything_else(digits):
    si = to.self_influence(digits.train, progress=False)
    seen = []

    def describe(x):
        seen.append(tuple(x.shape))
        return f"<b>ink {float(x.sum()):.1f}</b>"

    html = to.show(si, digits.train_data, n=3, render=describe)._repr_html_()
    assert seen == [(1, 8, 8)] * 3
    assert html.count("&lt;b&gt;ink ") == 3 and "<b>ink" not in html

    def as_picture(x):
        return np.kron(x.numpy()[0], np.ones((2, 2)))  # a (16, 16) array

    html = to.show(si, digits.train_data, n=2, render=as_picture)._repr_html_()
    assert len(PNG_URI.findall(html)) == 2
    with pytest.raises(ViewError, match="render returned a list"):
        to.show(si, digits.train_data, n=1, render=lambda x: [1, 2])


# ---- saving ------------------------------------------------------------------------------------
def test_save_html_and_png_follow_the_output_rule(digits, tmp_path):
    best = to.top_k(digits.test, digits.train, k=3, progress=False)
    view = to.show(best, digits.train_data, digits.test_data, n=2, labels=digits.true_labels)
    page = Path(view.save(tmp_path / "view.html"))
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "Content-Security-Policy" in text
    assert len(PNG_URI.findall(text)) == 2 * 7 and "<script" not in text
    png = Path(view.save(tmp_path / "view.png"))
    data = png.read_bytes()
    w, h = _png_size(data)
    assert w > 300 and h > 150 and b"Software\x00trackin-ooc" in data[:4096]
    with pytest.raises(to.StoreExistsError, match="overwrite=True"):
        view.save(png)
    assert Path(view.save(png, overwrite=True)) == png
    foreign = tmp_path / "mine.png"
    foreign.write_bytes(b"\x89PNG\r\n\x1a\nnot ours")
    with pytest.raises(to.OutputKindError, match="not written by trackin-ooc"):
        view.save(foreign, overwrite=True)
    assert foreign.read_bytes() == b"\x89PNG\r\n\x1a\nnot ours"
    with pytest.raises(to.OutputOverlapsInputError):
        view.save(Path(digits.train.path) / "view.html")  # never into a store
    with pytest.raises(ViewError, match=".html or .png"):
        view.save(tmp_path / "view.pdf")
    assert not list(tmp_path.glob(".*tmp*"))  # no half-written sibling left behind


def test_html_without_matplotlib_and_png_names_the_extra(digits, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["matplotlib"] = None  # as if the demo extra were not installed
        import numpy as np
        from sklearn.datasets import load_digits
        import trackin_ooc as to
        images = [(x[None] / 16.0, y) for x, y in zip(load_digits().images, load_digits().target)]
        train = to.open_store({digits.train.path!r})
        view = to.show(to.self_influence(train, progress=False), images, n=3)
        assert view._repr_html_().count("data:image/png") == 3
        view.save({str(tmp_path / "v.html")!r})
        try:
            view.save({str(tmp_path / "v.png")!r})
        except ImportError as e:
            print("ERR", e)
        assert "torch" not in sys.modules, "the views imported torch"
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1]
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ERR saving a view as .png needs matplotlib: pip install 'trackin-ooc[demo]'" in out.stdout
    assert (tmp_path / "v.html").exists() and not (tmp_path / "v.png").exists()


def test_bad_input_is_one_line(digits):
    si = to.self_influence(digits.train, progress=False)
    with pytest.raises(ViewError, match="show\\(\\) takes the result of to.top_k"):
        to.show(to.influence(digits.test, digits.train), digits.train_data)
    with pytest.raises(ViewError, match="example .* is not in the dataset of 10"):
        to.show(si, [(np.zeros((8, 8)), 0)] * 10, n=300)
    with pytest.raises(ViewError, match="n must be a positive integer"):
        to.show(si, digits.train_data, n=0)
    with pytest.raises(ViewError, match="no decode"):
        to.show(si, digits.train_data, tokenizer=object())


def test_token_gradient_mass_adds_up_to_the_embeddings_self_influence(texts, tmp_path):
    model, ckpts = texts.extra["model"], texts.extra["checkpoints"]
    # Reference: an exact capture of the embedding alone; its self-influence is Σ_c η_c ‖∂ℓ_c/∂E‖².
    emb = to.capture(model, ckpts, texts.train_data, tmp_path / "embed.zarr", layers=["embed"], progress=False)
    reference = to.self_influence(emb, progress=False).values
    rows = range(20)
    mass = to.token_gradient_mass(model, ckpts, texts.train_data, rows)
    distinct = 0
    for p in rows:
        item = texts.train_data[p]
        ids, keep = item["input_ids"].numpy(), item["attention_mask"].numpy().astype(bool)
        assert mass[p].shape == ids.shape and (mass[p][~keep] == 0).all() and (mass[p][keep] > 0).all()
        if len(set(ids[keep])) == keep.sum():  # distinct tokens: the rows of ∂ℓ/∂E are the per-token δ_t
            distinct += 1
            np.testing.assert_allclose(mass[p].sum(), reference[p], rtol=1e-4)
        else:  # a repeated token's δ_t add before squaring: mass and reference differ, both positive
            assert mass[p].sum() > 0 and reference[p] > 0
    assert distinct >= 2
    view = to.show(
        to.self_influence(texts.train, progress=False),
        texts.train_data,
        n=3,
        tokenizer=texts.tokenizer,
        token_weights={
            "train": to.token_gradient_mass(
                model, ckpts, texts.train_data, np.argsort(-to.self_influence(texts.train, progress=False).values)[:3]
            )
        },
    )
    assert view._repr_html_().count("background:rgba(255,140,0,1.00)") == 3  # the heaviest token of each
    with pytest.raises(ViewError, match="model has no module 'nope'; its embeddings: embed"):
        to.token_gradient_mass(model, ckpts, texts.train_data, [0], embedding="nope")


def test_hugging_face_style_items_pil_images_and_list_columns(digits):
    from PIL import Image

    # Items as a Hugging Face image dataset yields them: {"image": PIL image, "label": int}.
    split = digits.extra["split"]
    rows = [
        {"image": Image.fromarray((255 * img).astype(np.uint8)), "label": int(y)}
        for img, y in zip(split.train_images, split.train.tensors[1].numpy())
    ]
    si = to.self_influence(digits.train, progress=False)
    html = to.show(si, rows, n=4)._repr_html_()
    pictures = PNG_URI.findall(html)
    assert len(pictures) == 4 and _png_size(base64.b64decode(pictures[0])) == (8, 8)

    # ... and a text dataset whose columns are lists: token ids decoded, the text field shown as text.
    class Words:
        all_special_ids = [0]

        def decode(self, ids):
            return " ".join(f"w{i}" for i in ids)

    items = [{"input_ids": [0, 5 + i, 7, 0], "attention_mask": [1, 1, 1, 0], "labels": i % 2} for i in range(240)]
    html = to.show(si, items, n=2, tokenizer=Words())._repr_html_()
    top = np.argsort(-si.values, kind="stable")[:2]
    assert all(f"w{5 + t} w7<" in html for t in top) and "w0" not in html
    texts = [{"text": f"<b>text {i}</b>", "label": 0} for i in range(240)]
    assert f"&lt;b&gt;text {top[0]}&lt;/b&gt;" in to.show(si, texts, n=1)._repr_html_()
