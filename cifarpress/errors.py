"""User-facing errors: one sentence that names the problem and the fix.

The CLI prints these as a single red line and exits non-zero; anything else
that escapes is a bug and keeps its traceback.
"""


class CifarpressError(Exception):
    """An error caused by the user's input (recipe, file, data, model)."""

    exit_code = 1


class RecipeError(CifarpressError):
    exit_code = 2
