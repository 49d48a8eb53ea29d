"""What the command lines (train.py, python -m mrl.eval) share: an error a user can fix — a config value,
a data row, a file, the run folder, a diverged run — prints as one line naming what to fix, not as a
traceback. MRL_TRACEBACK=1 shows the traceback; any other exception shows it always. `naming` puts the name of
what to fix in front of a check's message.
"""

import os
import sys
from contextlib import contextmanager

from tqdm.auto import tqdm

USER_ERRORS = (ValueError, TypeError, OSError, ArithmeticError, ImportError)


def one_line_errors(kind, error, traceback) -> None:
    """A sys.excepthook: `program: Kind: message` on stderr (the exit status stays 1)."""
    if os.environ.get("MRL_TRACEBACK") or not issubclass(kind, USER_ERRORS):
        return sys.__excepthook__(kind, error, traceback)
    for bar in list(getattr(tqdm, "_instances", ())):  # a progress bar left open would print after the message
        bar.close()
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "mrl"
    print(f"{program}: {kind.__name__}: {error}  (MRL_TRACEBACK=1 shows the traceback)", file=sys.stderr)


@contextmanager
def naming(field: str):
    """Re-raise a ValueError from inside as `field: message`. A library check says what is wrong ("needs at least
    one dimension, got []") and its caller names what it was given: a parameter (`naming("dims")`) or a config
    field (`naming("loss.dims")`). A field ending in "." is the group of a check that names its own parameters:
    under `naming("loss.dim_sampling.")`, "schedule: ..." becomes "loss.dim_sampling.schedule: ...".
    """
    try:
        yield
    except ValueError as error:
        raise ValueError(f"{field}{'' if field.endswith('.') else ': '}{error}") from error
