"""python -m mmrnn_ext.bench: the mmrnn-bench command."""
import sys

from .cli import main

sys.exit(main())
