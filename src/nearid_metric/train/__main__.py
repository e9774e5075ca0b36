"""``python -m nearid_metric.train`` (and ``torchrun -m nearid_metric.train``): the ``nearid-train`` command."""

import sys

from nearid_metric.cli.train import main

sys.exit(main())
