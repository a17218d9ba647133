"""`python -m iiot` runs the command line."""

from iiot.cli import main

raise SystemExit(main())
