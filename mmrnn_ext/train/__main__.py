"""python -m mmrnn_ext.train (as torchrun launches it): the mmrnn-train command."""
import sys

from .cli import main

sys.exit(main())
