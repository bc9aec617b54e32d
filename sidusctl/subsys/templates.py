"""Templates are data: jinja2 files under ``templates/<consumer>/``, rendered with
StrictUndefined (a missing variable is an error, never an empty string). The one module that
knows how templates are found and rendered; every template has a golden-file test.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from sidusctl.core.errors import SidusError
from sidusctl.core.paths import templates_dir


@lru_cache(maxsize=8)
def environment(root: str | None = None) -> jinja2.Environment:
    """The jinja2 environment over ``root`` (default: the shipped ``templates/``)."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(root or str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def render(name: str, **context: Any) -> str:
    """Render the shipped template ``name`` (e.g. ``"pxelinux/default.j2"``).
    Raises :class:`SidusError` naming the template and the missing variable or syntax error."""
    try:
        return environment().get_template(name).render(**context)
    except jinja2.UndefinedError as e:
        raise SidusError(f"template {name}: {e.message}") from e
    except jinja2.TemplateError as e:
        raise SidusError(f"template {name}: {e}") from e


def render_file(path: Path, **context: Any) -> str:
    """Render a user's template file (a recipe's site file, say); same errors as :func:`render`."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(path.parent)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    try:
        return env.get_template(path.name).render(**context)
    except jinja2.UndefinedError as e:
        raise SidusError(f"{path}: {e.message}") from e
    except jinja2.TemplateSyntaxError as e:
        raise SidusError(f"{path}:{e.lineno}: template syntax error: {e.message}") from e
