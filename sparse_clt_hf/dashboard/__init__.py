"""Feature dashboards: per-feature activation histograms, examples across the activation range, logit
effects, a static offline site and exports for Neuronpedia and circuit-tracer (see ``docs/dashboards.md``).

- :mod:`.accumulate`: :func:`dashboard_stats` streams an extraction (or in-memory Features) into
  :class:`DashboardStats` (:mod:`.stats`; ``DIR/dashboard.safetensors``), in the same pass as the base
  ``stats.safetensors``;
- :mod:`.logits`: :func:`logit_effects`, the tokens each feature's decoder raises and lowers;
- :mod:`.site`: :func:`build_site`, the static site;
- :mod:`.exports`: :func:`export_neuronpedia`, :func:`export_circuit_tracer`;
- :mod:`.exact`: :func:`exact_frequency`, chosen features' exact frequency by dense encoding (an
  extraction's top-k frequency is a lower bound).
"""

from __future__ import annotations

from .accumulate import dashboard_stats
from .exact import ExactFrequency, exact_frequency, load_exact
from .stats import DASHBOARD_FILE, DashboardStats, Example, density_histogram

__all__ = ["DASHBOARD_FILE", "DashboardStats", "ExactFrequency", "Example", "dashboard_stats", "density_histogram",
           "exact_frequency", "load_exact"]
