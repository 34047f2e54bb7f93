"""python -m labelsmooth_ext [info|bench|demo] — see `python -m labelsmooth_ext --help`."""
from .cli import main

raise SystemExit(main())
