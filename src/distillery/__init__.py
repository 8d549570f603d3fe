"""distillery: knowledge distillation for PyTorch.

The five mechanisms, each importable on its own::

    from distillery import losses, Taps, ModuleTeacher, Objective, Term, fit

and the whole recipe pipeline::

    from distillery import load_recipe, run
    result = run(load_recipe("mnist1d/kd", ["distill.train.epochs=5"]))
"""

from . import losses
from .config import TrainConfig
from .engine import evaluate, fit
from .errors import DistilleryError
from .objective import Objective, Term
from .pipeline import run
from .recipes import load as load_recipe
from .taps import Taps
from .teachers import ModuleTeacher, PrecomputedTeacher, Teacher

__version__ = "0.1.0"

__all__ = [
    "DistilleryError", "ModuleTeacher", "Objective", "PrecomputedTeacher", "Taps", "Teacher", "Term",
    "TrainConfig", "evaluate", "fit", "load_recipe", "losses", "run",
]
