import sys

from sagellm_server.control_plane.cli import main

sys.exit(main())
