"""``python -m nearid_metric.cli`` (and ``torchrun -m nearid_metric.cli``): the ``nearid-score`` command."""

import sys

from nearid_metric.cli.score import main

sys.exit(main())
