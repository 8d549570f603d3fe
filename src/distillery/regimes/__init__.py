"""Regimes: online (mutual), self (EMA, born-again) and progressive (teacher-assistant chains)
distillation, each a small function or module over the one engine, objective and teacher protocol."""

from .datafree import Generator, data_free
from .online import Peers, dml_terms
from .progressive import chain
from .selfdist import EMATeacher, born_again

__all__ = ["EMATeacher", "Generator", "Peers", "born_again", "chain", "data_free", "dml_terms"]
