"""``python -m corral.bench``."""

from corral.bench.run import main

raise SystemExit(main())
