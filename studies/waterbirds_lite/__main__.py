"""``python -m studies.waterbirds_lite`` (from a checkout's root): the Waterbirds-lite study's command."""
import sys

from studies.waterbirds_lite.cli import main

sys.exit(main())
