"""The ``sparse-clt-hf`` sub-commands: one module per sub-command, listed once in :data:`COMMANDS`.

Contract of a command module ``sparse_clt_hf.commands.<name>``:

- ``add_arguments(parser: argparse.ArgumentParser) -> None`` adds its options (the CLI adds ``--json``
  to every sub-command itself);
- ``run(args: argparse.Namespace) -> int`` runs it and returns the exit code (0 success, 1 a failure it
  reports; :class:`~sparse_clt_hf.errors.SparseCLTError`, ``FileNotFoundError`` and ``ValueError`` are
  reported by the CLI as exit code 1).

Adding a sub-command is a module and one entry in :data:`COMMANDS` (modules are imported lazily, so a
command's dependencies load only when it is used).
"""

from __future__ import annotations

#: name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("sparse_clt_hf.commands.demo", "generate with SmolLM2 and a demo transcoder, print features per token"),
    "generate": ("sparse_clt_hf.commands.generate", "generate with any model and transcoder, print or save the features"),
    "inspect": (
        "sparse_clt_hf.commands.inspect",
        "describe a transcoder (format, layers, width, site) without loading weights",
    ),
    "convert": ("sparse_clt_hf.commands.convert", "convert any supported format into the native (circuit-tracer) layout"),
    "push": ("sparse_clt_hf.commands.push", "upload a native transcoder folder to the Hub with a model card"),
    "train": ("sparse_clt_hf.commands.train", "fit a CLT or PLT on a model's own activations"),
    "bench": ("sparse_clt_hf.commands.bench", "measure capture overhead, memory and encode speed"),
    "extract": ("sparse_clt_hf.commands.extract", "extract transcoder features over a corpus into resumable shards"),
    "stats": ("sparse_clt_hf.commands.stats", "per-feature statistics and max-activating contexts of an extraction"),
    "view": ("sparse_clt_hf.commands.view",
             "write the HTML page of saved features (a features file or an extraction folder)"),
    "attribute": ("sparse_clt_hf.commands.attribute",
                  "why the model predicts its next token: an attribution graph (JSON, HTML page, summary)"),
    "explain": ("sparse_clt_hf.commands.explain",
                "what a feature responds to: its top tokens, frequency, max and max-activating contexts"),
    "dashboard": ("sparse_clt_hf.commands.dashboard",
                  "a static offline site of feature dashboards (and Neuronpedia / circuit-tracer exports)"),
    "serve": ("sparse_clt_hf.commands.serve",
              "an OpenAI-compatible HTTP server whose completions carry every token's features"),
}
