from __future__ import annotations

import sys

from sagellm.bench.main import main

sys.exit(main())
