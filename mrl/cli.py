"""What the command lines (train.py, python -m mrl.eval) share: an error a user can fix — a config value,
a data row, a file, the run folder, a diverged run — prints as one line naming what to fix, not as a
traceback. MRL_TRACEBACK=1 shows the traceback; any other exception shows it always.
"""

import os
import sys

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
