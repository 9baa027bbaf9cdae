"""``python -m sparse_clt_hf`` (what ``accelerate launch -m sparse_clt_hf extract ...`` runs)."""

import sys

from .cli import main

sys.exit(main())
