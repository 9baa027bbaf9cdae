"""The documentation cannot rot: every ```python block of README.md and docs/*.md runs, and the docs site
builds with ``mkdocs build --strict`` (broken links, missing pages, pages left out of the navigation fail).

The rule for code blocks (docs/development.md, "Documentation"): the blocks of one page run in order in one
namespace, in a fresh temporary folder, with tiny stand-ins for the names they load: any
``AutoModelForCausalLM.from_pretrained`` gives a tiny random Llama (8 layers, d 32), any
``AutoTokenizer.from_pretrained`` a one-character-per-token tokenizer, any string reference given to
``attach_clt`` / ``CrossLayerTranscoder.from_pretrained`` a random TopK transcoder (layers 0-7, 2048 features,
decoders) saved in the folder. Everything else is the real library. Names a page uses without defining them
(model, tok, inputs, prompts) come from ``docs_env``; files a page reads, from PAGE_SETUP. A block marked ``<!-- no-run: reason -->`` on the line above is skipped (reason required).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import random_transcoder
from test_demo import char_tokenizer
from tiny_models import _llama_kwargs

import sparse_clt_hf
from sparse_clt_hf import CrossLayerTranscoder

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)\s*$")
NO_RUN = re.compile(r"^<!--\s*no-run:(.*?)-->\s*$")
STAND_IN_LAYERS = 8
STAND_IN_WIDTH = 2048


def code_blocks(path: Path) -> list[tuple[int, str, str, str | None]]:
    """``(line, language, code, no-run reason or None)`` of every fenced block of a Markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group(1):
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        assert j < len(lines), f"{path.name}:{start + 1}: unclosed code block"
        prev = lines[start - 1] if start else ""
        mark = NO_RUN.match(prev.strip())
        out.append((start + 1, lang, "\n".join(lines[start + 1:j]) + "\n", mark.group(1).strip() if mark else None))
        i = j + 1
    return out


def python_pages() -> list[Path]:
    return [p for p in PAGES if any(lang == "python" for _, lang, _, _ in code_blocks(p))]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """A tiny Llama (saved with its tokenizer) and a random TopK CLT with decoders for it, on disk."""
    root = tmp_path_factory.mktemp("stand-ins")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**_llama_kwargs(), "num_hidden_layers": STAND_IN_LAYERS})
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    tc = random_transcoder(d=cfg.hidden_size, layers=range(STAND_IN_LAYERS), widths=[STAND_IN_WIDTH] * STAND_IN_LAYERS,
                           activation="topk", k=32, decoders=True, site="mlp_in")
    tc.config.model_name = None
    tc.save_pretrained(root / "clt")
    return root


@pytest.fixture
def docs_env(stand_ins, tmp_path, monkeypatch):
    """Loaders patched to the stand-ins, a fresh working folder, and the page globals."""
    model_dir, clt_dir = stand_ins / "model", str(stand_ins / "clt")
    model_cls, tok_cls = transformers.LlamaForCausalLM, transformers.PreTrainedTokenizerFast

    def load_model(*args, **kwargs):
        return model_cls.from_pretrained(model_dir).eval()

    def load_tokenizer(*args, **kwargs):
        tok = tok_cls.from_pretrained(model_dir)
        tok.padding_side = kwargs.get("padding_side", tok.padding_side)
        tok.model_input_names = ["input_ids", "attention_mask"]  # as a causal LM's tokenizer (no token_type_ids)
        return tok

    real_attach, real_load = sparse_clt_hf.attach_clt, CrossLayerTranscoder.from_pretrained.__func__
    real_attribute = sparse_clt_hf.attribute

    def attach(model, transcoder, *args, **kwargs):
        return real_attach(model, clt_dir if isinstance(transcoder, str) else transcoder, *args, **kwargs)

    def attribute(model, transcoder, *args, **kwargs):
        return real_attribute(model, clt_dir if isinstance(transcoder, str) else transcoder, *args, **kwargs)

    def from_pretrained(cls, ref, *args, **kwargs):
        return real_load(cls, clt_dir if isinstance(ref, str) else ref, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", load_tokenizer)
    monkeypatch.setattr(sparse_clt_hf, "attach_clt", attach)
    monkeypatch.setattr(sparse_clt_hf, "attribute", attribute)
    monkeypatch.setattr(CrossLayerTranscoder, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MKL_CBWR", os.environ.get("MKL_CBWR", "AUTO,STRICT"))  # `extract` sets it: undone after
    tok = load_tokenizer(padding_side="left")
    prompts = ["The cat sat", "Hello there, world"]
    return {
        "stand_ins": stand_ins,
        "globals": {"prompts": prompts, "model": load_model(), "tok": tok,
                    "inputs": tok(prompts, return_tensors="pt", padding=True),
                    "attach_clt": attach, "CrossLayerTranscoder": CrossLayerTranscoder},
    }


def extraction_setup(env) -> None:
    """docs/extraction.md reads an extraction in ``feats/``: make one with the stand-ins."""
    from sparse_clt_hf import cli

    Path("corpus.txt").write_text("\n".join(f"document {i}: the cat sat on the mat {i}" for i in range(6)))
    root = env["stand_ins"]
    assert cli.main(["extract", "--model", str(root / "model"), "--clt", str(root / "clt"), "--data", "corpus.txt",
                     "--out", "feats", "--seq-len", "32", "--batch-size", "4", "--top-k", "8", "--no-progress"]) == 0


PAGE_SETUP = {"extraction.md": extraction_setup}


@pytest.mark.parametrize("page", python_pages(), ids=lambda p: p.name)
def test_python_blocks_run(page, docs_env):
    blocks = [b for b in code_blocks(page) if b[1] == "python"]
    for line, _, _, reason in blocks:
        assert reason is None or reason, f"{page.name}:{line}: a no-run mark needs a reason"
    runnable = [(line, code) for line, _, code, reason in blocks if reason is None]
    if not runnable:
        pytest.skip(f"{page.name}: every python block is marked no-run")
    setup = PAGE_SETUP.get(page.name)
    if setup is not None:
        setup(docs_env)
    namespace = {"__name__": f"docs_{page.stem}", **docs_env["globals"]}
    for line, code in runnable:
        try:
            exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)  # noqa: S102
        except Exception as e:
            raise AssertionError(f"{page.relative_to(ROOT)}, the python block at line {line} failed: "
                                 f"{type(e).__name__}: {e}") from e


def test_readme_usage_writes_a_page_of_the_generated_tokens(docs_env):
    """The README's usage block, checked for what it claims: a page whose tokens are ``out``'s first row."""
    from test_view import embedded

    block = next(code for _, lang, code, reason in code_blocks(ROOT / "README.md") if lang == "python" and reason is None)
    namespace = {"__name__": "readme"}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    out = namespace["out"]
    assert torch.is_tensor(out)
    data = embedded(Path("view.html").read_text(encoding="utf-8"))
    pad = int((namespace["inputs"]["attention_mask"][0] == 0).sum())
    assert [tk["id"] for tk in data["tokens"]] == out[0, pad:].tolist()  # padding left out, the last token shown
    assert data["prompt_len"] == namespace["inputs"]["input_ids"].shape[1]


def test_no_run_marks_and_fences_parse(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("text\n<!-- no-run: needs the Hub -->\n```python\nraise SystemExit\n```\n\n```bash\nls\n```\n"
                    "```python\nx = 1\n```\n")
    assert code_blocks(page) == [(3, "python", "raise SystemExit\n", "needs the Hub"), (7, "bash", "ls\n", None),
                                 (10, "python", "x = 1\n", None)]


def test_mkdocs_build_strict(tmp_path):
    """Every page in the navigation exists, every page is in it, every relative link and anchor resolves."""
    pytest.importorskip("mkdocs")
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_COLOR": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    nav_pages = set(re.findall(r":\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
    assert nav_pages == {p.name for p in (ROOT / "docs").glob("*.md")}
    assert (site / "steering" / "index.html").is_file()
    shutil.rmtree(site, ignore_errors=True)


def test_readme_links_resolve():
    """The README is not part of the site: its relative links are checked here (file and anchor)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, _anchor = target.partition("#")
        assert (ROOT / path).exists(), f"README links to {target}, which does not exist"
