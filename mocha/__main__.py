"""``python -m mocha`` is the ``mocha`` command (used by the job files' shebang lines, so a
job submitted with only ``--working-dir .`` runs without the package being installed)."""

import sys

from mocha.cli import main

sys.exit(main())
