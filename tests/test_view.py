"""The HTML feature view (Features.to_html / sparse_clt_hf.view): the embedded data against the Features
tensors, escaping of hostile token text, self-containment, and (when a chromium binary is installed)
the page as a browser renders it."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from sparse_clt_hf import Features
from sparse_clt_hf.view import DATA_ID, feature_label, page_data

HOSTILE = "</script><img src=x onerror=alert(1)>"
VOCAB = ["<pad>", "<bos>", "Hello", " world", ",", " the", " cat", "\n", " sat", ".", HOSTILE, "\tdef", " on", "!"]
SPECIAL = [0, 1]


class FakeTokenizer:
    """decode / all_special_ids over a fixed list: id i decodes to VOCAB[i]."""

    all_special_ids = SPECIAL

    def decode(self, ids, skip_special_tokens=False):
        return "".join(VOCAB[int(i)] for i in ids)


LAYERS = [3, 5]
K = 4
WIDTH = 16


def make_features() -> tuple[Features, torch.Tensor]:
    """Two rows, 8 positions, layers 3 and 5, k 4; row 1 left-padded by 2; some empty slots.
    Returns (features, sequences [2, 9]) as after generate (the last token has no features)."""
    g = torch.Generator().manual_seed(0)
    b, t = 2, 8
    seq = torch.tensor([[1, 2, 3, 4, 10, 5, 6, 7, 8], [0, 0, 1, 5, 6, 8, 12, 11, 13]])
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, :2] = False
    values = torch.rand(b, t, len(LAYERS), K, generator=g).mul(5).sort(-1, descending=True).values
    indices = torch.stack([torch.randperm(WIDTH, generator=g)[:K] for _ in range(b * t * len(LAYERS))]).view(
        b, t, len(LAYERS), K).int()
    # empty slots: fewer than k active at some positions
    indices[0, 2, 0, 2:] = -1
    indices[0, 5, 1, 1:] = -1
    indices[0, 6, 0, :] = -1
    values[indices < 0] = 0
    l0 = (indices >= 0).sum(-1) + torch.tensor([0, 3]).view(1, 1, 2)  # layer 5 had more than k active
    # padding holds garbage that must not show up
    indices[1, :2] = 15
    feats = Features(indices, values, l0, mask, list(LAYERS), seq[:, :t].clone(), [WIDTH, WIDTH])
    return feats, seq


@dataclass
class Context:
    document: int
    position: int
    activation: float
    token_ids: list[int]
    index: int


class FakeStats:
    """The FeatureStats interface the view reads, with deterministic values derived from (layer, feature)."""

    def __init__(self, layers=(3, 5)):
        self.layers = list(layers)
        self.n_features = [WIDTH] * len(self.layers)
        self.n_positions = 1000
        self.calls: list[tuple] = []

    def _col(self, layer, scale):
        return torch.arange(WIDTH, dtype=torch.float32) * scale + layer

    def frequency(self, layer):
        return (torch.arange(WIDTH, dtype=torch.float32) + 1) / 1000

    def mean(self, layer):
        return self._col(layer, 0.1)

    def max(self, layer):
        return self._col(layer, 0.5) + 5  # at least 5 > every activation in make_features

    def count(self, layer):
        return torch.arange(WIDTH) + 1

    def top_contexts(self, layer, feature):
        self.calls.append((layer, feature))
        long = [2, 3, 4] * 10  # 30 tokens: trimmed around the max token
        return [Context(document=feature, position=7, activation=float(self.max(layer)[feature]), token_ids=long,
                        index=20),
                Context(document=99, position=1, activation=1.5, token_ids=[5, 6, HOSTILE_ID], index=2)]

    def top_tokens(self, layer, feature, n=3):
        return [(feature + j) % 12 + 2 for j in range(n)]


HOSTILE_ID = VOCAB.index(HOSTILE)


def embedded(text: str) -> dict:
    m = re.search(rf'<script type="application/json" id="{DATA_ID}">(.*?)</script>', text, re.S)
    assert m, "no embedded data"
    return json.loads(m.group(1))


def template_part(text: str) -> str:
    """The page without its data block."""
    return re.sub(rf'(<script type="application/json" id="{DATA_ID}">).*?(</script>)', r"\1\2", text, flags=re.S)


# ---------------------------------------------------------------------------- data and structure
@pytest.mark.parametrize("row", [0, 1])
def test_embedded_data_round_trips_to_the_features(tmp_path, row):
    feats, seq = make_features()
    path = feats.to_html(tmp_path / "v.html", FakeTokenizer(), row=row, sequences=seq, prompt_len=5)
    data = embedded(path.read_text(encoding="utf-8"))
    assert data["layers"] == LAYERS and data["k"] == K and data["row"] == row and data["prompt_len"] == 5
    recorded = [tk for tk in data["tokens"] if tk["rec"]]
    expected_positions = [t for t in range(feats.num_positions) if feats.mask[row, t]]
    assert [tk["t"] for tk in recorded] == expected_positions  # padding excluded
    for tk in recorded:
        t = tk["t"]
        assert tk["id"] == int(feats.token_ids[row, t])
        assert tk["l0"] == feats.l0[row, t].tolist()
        for li in range(len(LAYERS)):
            ids = feats.indices[row, t, li]
            keep = ids >= 0
            assert [f for f, _ in tk["f"][li]] == ids[keep].tolist()
            assert [v for _, v in tk["f"][li]] == pytest.approx(feats.values[row, t, li][keep].tolist(), rel=1e-3)
    # the last token of the sequence: shown, not recorded
    last = data["tokens"][-1]
    assert last == {"t": feats.num_positions, "id": int(seq[row, -1]), "rec": False}
    # every id on the page decodes as the tokenizer decodes it alone
    for tk in data["tokens"]:
        assert data["vocab"][str(tk["id"])] == VOCAB[tk["id"]]
    assert data["stats"] is None and data["special"] == SPECIAL


def test_without_sequences_or_token_ids():
    feats, seq = make_features()
    data = page_data(feats, FakeTokenizer())
    assert all(tk["rec"] for tk in data["tokens"]) and len(data["tokens"]) == feats.num_positions
    feats.token_ids = None
    with pytest.raises(ValueError, match="no token ids"):
        page_data(feats, FakeTokenizer())
    data = page_data(feats, FakeTokenizer(), sequences=seq[0])  # 1-D sequence for row 0
    assert [tk["id"] for tk in data["tokens"]] == seq[0].tolist()
    with pytest.raises(IndexError):
        page_data(feats, FakeTokenizer(), row=2, sequences=seq)


def test_sequences_must_match_the_recorded_tokens():
    feats, seq = make_features()
    with pytest.raises(ValueError, match="disagree"):
        page_data(feats, FakeTokenizer(), row=0, sequences=seq.flip(0))
    with pytest.raises(ValueError, match="covers|cover"):
        page_data(feats, FakeTokenizer(), sequences=seq[:, :3])


def test_hostile_token_text_is_escaped(tmp_path):
    feats, seq = make_features()
    path = feats.to_html(tmp_path / "v.html", FakeTokenizer(), FakeStats(), sequences=seq, title="<b>x</b>")
    text = path.read_text(encoding="utf-8")
    assert HOSTILE not in text and "<img" not in text
    assert text.count("</script>") == 2  # the data block and the code block, nothing else closes a script
    assert "<title>&lt;b&gt;x&lt;/b&gt;</title>" in text
    data = embedded(text)
    assert data["vocab"][str(HOSTILE_ID)] == HOSTILE  # round-trips intact
    assert data["title"] == "<b>x</b>"


def test_page_is_self_contained(tmp_path):
    feats, seq = make_features()
    text = feats.to_html(tmp_path / "v.html", FakeTokenizer(), FakeStats(), sequences=seq).read_text(encoding="utf-8")
    page = template_part(text)
    assert "http:" not in page and "https:" not in page
    assert not re.search(r"""\b(src|href)\s*=""", page, re.I)
    assert not re.search(r"""url\(|@import|fetch\(|XMLHttpRequest|WebSocket|EventSource|import\(""", page)
    assert not re.search(r"""<(link|iframe|img|object|embed)\b""", page, re.I)
    assert "<style>" in page and "<script>" in page  # inline CSS and JS


def test_stats_only_for_features_on_the_page(tmp_path):
    feats, seq = make_features()
    stats = FakeStats(layers=[3])  # no statistics for layer 5
    data = page_data(feats, FakeTokenizer(), stats, row=1, sequences=seq)
    on_page = {(LAYERS[li], int(f))
               for t in range(feats.num_positions) if feats.mask[1, t]
               for li in range(len(LAYERS)) for f in feats.indices[1, t, li].tolist() if f >= 0}
    assert set(data["stats"]) == {f"{layer}/{f}" for layer, f in on_page if layer == 3}
    assert (3, 15) not in on_page or "3/15" in data["stats"]
    assert not any(layer == 5 for layer, _ in stats.calls)
    f = next(iter(sorted(on_page)))[1]
    entry = data["stats"][f"3/{f}"]
    assert entry["freq"] == pytest.approx((f + 1) / 1000) and entry["max"] == pytest.approx(3 + 0.5 * f + 5)
    assert entry["count"] == f + 1 and entry["top"] == stats.top_tokens(3, f)
    long_ctx, short_ctx = entry["ctx"]
    assert long_ctx["ids"][long_ctx["i"]] == [2, 3, 4][20 % 3] and long_ctx["cut"] == [True, True]
    assert len(long_ctx["ids"]) == 16 + 1 + 6 and long_ctx["doc"] == f
    assert short_ctx["ids"] == [5, 6, HOSTILE_ID] and short_ctx["i"] == 2 and short_ctx["cut"] == [False, False]
    for key in ("2", "3", "4", str(HOSTILE_ID)):
        assert key in data["vocab"]  # context and label tokens are decodable on the page


def test_feature_label():
    stats = FakeStats()
    assert feature_label(stats, FakeTokenizer(), 3, 1) == repr([VOCAB[3], VOCAB[4], VOCAB[5]])
    assert feature_label(stats, FakeTokenizer(), 3, 1, n=1) == "[' world']"
    assert feature_label(None, FakeTokenizer(), 3, 1) == ""
    assert feature_label(stats, FakeTokenizer(), 7, 1) == ""


def test_real_tokenizer(tmp_path):
    """A transformers fast tokenizer works as the tokenizer argument."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "a": 1, "b": 2, "c": 3}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    ids = torch.tensor([[1, 2, 3]])
    feats = Features(torch.tensor([[[[4, -1]]] * 3]).int(), torch.tensor([[[[1.0, 0.0]]] * 3]),
                     torch.ones(1, 3, 1, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool), [0], ids)
    data = embedded(feats.to_html(tmp_path / "r.html", fast).read_text(encoding="utf-8"))
    assert [data["vocab"][str(tk["id"])] for tk in data["tokens"]] == ["a", "b", "c"]
    assert data["special"] == [0]


# ---------------------------------------------------------------------------- in a browser
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no chromium binary (apt-get install chromium)")


def run_chromium(*args: str, timeout: float = 60) -> str:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--disable-extensions", "--virtual-time-budget=3000", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


class DomParser(HTMLParser):
    """Collects the attributes and text of the elements the tests look at."""

    def __init__(self):
        super().__init__()
        self.stack: list[tuple[str, dict]] = []
        self.selected: list[dict] = []
        self.tokens: list[tuple[dict, str]] = []
        self.rows: list[dict] = []
        self.marks: list[str] = []
        self.feature_box: dict | None = None
        self.in_feature = 0
        self.feature_text: list[str] = []
        self.token_panel_text: list[str] = []
        self.in_token_panel = 0
        self._tok: list | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "span" and "tok" in classes:
            self._tok = [a, ""]
            if "selected" in classes:
                self.selected.append(a)
        if tag == "tr" and "feat-row" in classes:
            self.rows.append(a)
        if a.get("id") == "feature":
            self.feature_box = a
            self.in_feature = 1
        elif self.in_feature:
            self.in_feature += 1
        if a.get("id") == "token":
            self.in_token_panel = 1
        elif self.in_token_panel:
            self.in_token_panel += 1
        if tag == "mark":
            self.marks.append("")
        self.stack.append((tag, a))

    def handle_endtag(self, tag):
        if self._tok is not None and tag == "span":
            self.tokens.append(tuple(self._tok))
            self._tok = None
        if self.in_feature:
            self.in_feature -= 1
        if self.in_token_panel:
            self.in_token_panel -= 1
        if self.stack:
            self.stack.pop()

    def handle_data(self, data):
        if self._tok is not None:
            self._tok[1] += data
        if self.in_feature:
            self.feature_text.append(data)
        if self.in_token_panel:
            self.token_panel_text.append(data)
        if self.stack and self.stack[-1][0] == "mark":
            self.marks[-1] += data


def dump(path: Path, fragment: str) -> DomParser:
    out = run_chromium("--dump-dom", path.resolve().as_uri() + fragment)
    assert 'data-ready="1"' in out, "the page script did not finish"
    p = DomParser()
    p.feed(out)
    return p


def test_browser_selects_token_from_fragment(tmp_path):
    feats, seq = make_features()
    path = feats.to_html(tmp_path / "view.html", FakeTokenizer(), sequences=seq, prompt_len=5)
    dom = dump(path, "#t=3")
    assert [a["data-t"] for a in dom.selected] == ["3"]
    # tokens shown: every unpadded position and the unrecorded last one, whitespace visible
    shown = [(int(a["data-t"]), text) for a, text in dom.tokens]
    assert [t for t, _ in shown] == list(range(9))
    assert dict(shown)[3] == ","
    assert dict(shown)[2] == "\u00b7world" and dict(shown)[7] == "\u21b5"
    assert dict(shown)[4] == HOSTILE.replace(" ", "\u00b7")  # rendered as text, not markup
    assert "unrec" in dom.tokens[-1][0]["class"]
    # the panel lists position 3's features, per layer, strongest first: straight from the tensor
    expected = [(str(LAYERS[li]), str(int(f))) for li in range(len(LAYERS))
                for f in feats.indices[0, 3, li].tolist() if f >= 0]
    assert [(r["data-layer"], r["data-feature"]) for r in dom.rows] == expected
    assert dom.feature_box is not None and "hidden" in dom.feature_box


def test_browser_padding_excluded_and_unrecorded_token(tmp_path):
    feats, seq = make_features()
    path = feats.to_html(tmp_path / "view.html", FakeTokenizer(), row=1, sequences=seq, prompt_len=5)
    dom = dump(path, f"#t={feats.num_positions}")
    assert [int(a["data-t"]) for a, _ in dom.tokens] == list(range(2, 9))
    assert [a["data-t"] for a in dom.selected] == [str(feats.num_positions)]
    assert dom.rows == [] and "Not recorded" in "".join(dom.token_panel_text)


def test_browser_feature_panel_with_stats(tmp_path):
    feats, seq = make_features()
    f = int(feats.indices[0, 3, 1, 0])
    path = feats.to_html(tmp_path / "view.html", FakeTokenizer(), FakeStats(), sequences=seq, prompt_len=5)
    dom = dump(path, f"#t=3&f=5/{f}")
    assert dom.feature_box is not None and "hidden" not in dom.feature_box
    assert dom.feature_box["data-layer"] == "5" and dom.feature_box["data-feature"] == str(f)
    text = "".join(dom.feature_text)
    assert f"Feature L5/{f}" in text and "Max-activating contexts" in text
    label = [VOCAB[i] for i in FakeStats().top_tokens(5, f)]
    for word in label:
        assert word.replace(" ", "\u00b7") in text
    assert f"doc {f}" in text and "doc 99" in text
    assert dom.marks == [VOCAB[[2, 3, 4][20 % 3]].replace(" ", "\u00b7"), HOSTILE.replace(" ", "\u00b7")]  # the max token of each context
    panel = "".join(dom.token_panel_text)
    assert "%max" in panel and "freq" in panel
    assert [r for r in dom.rows if "active" in r["class"]] == [{"class": "feat-row active", "data-layer": "5",
                                                                "data-feature": str(f)}]


def png_pixels_vary(data: bytes) -> bool:
    """Whether a PNG holds more than one colour (PIL when installed, else its decompressed rows)."""
    try:
        import io

        from PIL import Image

        img = Image.open(io.BytesIO(data)).convert("RGB")
        return img.getextrema() != tuple((c, c) for c in img.getpixel((0, 0)))
    except ImportError:
        pass
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    return len(set(zlib.decompress(idat))) > 20


def test_browser_screenshot_not_blank(tmp_path):
    feats, seq = make_features()
    path = feats.to_html(tmp_path / "view.html", FakeTokenizer(), FakeStats(), sequences=seq, prompt_len=5)
    shot = tmp_path / "shot.png"
    run_chromium(f"--screenshot={shot}", "--window-size=1200,900", path.resolve().as_uri() + "#t=3&f=3/" +
                 str(int(feats.indices[0, 3, 0, 0])))
    data = shot.read_bytes()
    assert len(data) > 10_000
    w, h = struct.unpack(">II", data[16:24])
    assert (w, h) == (1200, 900)
    assert png_pixels_vary(data)


# ---------------------------------------------------------------------------- the --html flag
def test_generate_cli_writes_html(tmp_path, capsys):
    from conftest import random_transcoder
    from tiny_models import tiny_model
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sparse_clt_hf import cli

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{chr(32 + i): 3 + i for i in range(95)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>")
    tiny_model("llama").save_pretrained(tmp_path / "model")
    fast.save_pretrained(tmp_path / "model")
    tc = random_transcoder(d=32, layers=(0, 1, 2), site="resid_mid")
    tc.config.model_name = None
    tc.save_pretrained(tmp_path / "clt")
    html_path = tmp_path / "view.html"
    rc = cli.main(["generate", "--model", str(tmp_path / "model"), "--clt", str(tmp_path / "clt"), "--prompt", "hi </b>",
                   "--no-chat-template", "--max-new-tokens", "4", "--top-k", "4", "--html", str(html_path),
                   "--out", str(tmp_path / "f.safetensors")])
    assert rc == 0
    assert f"saved HTML view to {html_path}" in capsys.readouterr().out
    feats = Features.load(tmp_path / "f.safetensors")
    data = embedded(html_path.read_text(encoding="utf-8"))
    assert data["prompt_len"] == len("hi </b>")
    assert [tk["t"] for tk in data["tokens"]] == list(range(feats.num_positions + 1))
    assert [tk["rec"] for tk in data["tokens"]] == [True] * feats.num_positions + [False]
    assert data["layers"] == [0, 1, 2] and data["title"] == "sparse-clt-hf: hi </b>"
    # with --json, stdout stays one JSON document and the notice goes to stderr
    rc = cli.main(["generate", "--json", "--model", str(tmp_path / "model"), "--clt", str(tmp_path / "clt"),
                   "--prompt", "hi", "--max-new-tokens", "2", "--html", str(tmp_path / "j.html")])
    out = capsys.readouterr()
    assert rc == 0 and json.loads(out.out)["summary"]["html"] == str(tmp_path / "j.html")
    assert "saved HTML view to" in out.err and (tmp_path / "j.html").is_file()


DRIVER = """<script>
(function () {
  const rec = (name, value) => { document.body.dataset[name] = value; };
  const head = () => document.querySelector("#token h2").textContent;
  document.querySelector('.tok[data-t="2"]').click();
  rec("afterClick", location.hash);
  document.querySelector('.tok[data-t="5"]').dispatchEvent(new MouseEvent("mouseenter"));
  rec("hoverHead", head());
  document.querySelector('.tok[data-t="5"]').dispatchEvent(new MouseEvent("mouseleave"));
  rec("leaveHead", head());
  const row = document.querySelector("tr.feat-row");
  rec("clickedFeature", row.dataset.layer + "/" + row.dataset.feature);
  row.click();
  rec("afterFeature", location.hash);
  rec("mode", document.getElementById("mode").value);
  document.dispatchEvent(new KeyboardEvent("keydown", { key: "ArrowRight" }));
  rec("afterKey", location.hash);
  document.dispatchEvent(new KeyboardEvent("keydown", { key: "Escape" }));
  rec("afterEscape", location.hash + "|" + document.getElementById("feature").hidden);
})();
</script>
</body>"""


def test_browser_click_hover_and_keys(tmp_path):
    """The page's own handlers, driven by events dispatched from an injected script."""
    feats, seq = make_features()
    path = feats.to_html(tmp_path / "view.html", FakeTokenizer(), FakeStats(), sequences=seq, prompt_len=5)
    path.write_text(path.read_text(encoding="utf-8").replace("</body>", DRIVER), encoding="utf-8")
    out = run_chromium("--dump-dom", path.resolve().as_uri())
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', re.search(r"<body[^>]*>", out).group(0)))
    assert attrs["ready"] == "1"
    assert attrs["after-click"] == "#t=2"
    assert attrs["hover-head"].startswith("#5 ") and "(hover)" in attrs["hover-head"]
    assert attrs["leave-head"].startswith("#2 ")
    first = f"{LAYERS[0]}/{int(feats.indices[0, 2, 0, 0])}"  # strongest feature of the first layer at position 2
    assert attrs["clicked-feature"] == first
    assert attrs["after-feature"] == f"#t=2&amp;f={first}" and attrs["mode"] == "feat"
    assert attrs["after-key"] == f"#t=3&amp;f={first}"
    assert attrs["after-escape"] == "#t=3|true"
