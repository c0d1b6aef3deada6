"""memcalc: how much GPU memory a training run takes, term by term, and whether it fits.

The estimate path (everything but ``memcalc.verify``) imports neither torch nor transformers.
"""

__version__ = "0.1.0"
