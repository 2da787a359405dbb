"""Write the site: render the templates, copy the static assets, publish the boards' CSVs.

Every file goes through :func:`bench.files.atomic_write_bytes`. The site directory keeps a
list of what it wrote (``.certbench-site``); a rebuild deletes the files of the previous build
that it no longer writes (e.g. the page of a row that left the board), and nothing else, so
pointing ``--out`` at a directory that holds other files is safe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import jinja2

from bench import __version__
from bench.errors import RegistryError
from bench.files import atomic_write_bytes
from bench.leaderboard import build_boards, publish
from bench.site.pages import DefenseLookup, board_context, row_context
from bench.store import Store

MANIFEST = ".certbench-site"
STATIC_FILES = ("site.css", "site.js")
DEFAULT_TITLE = "certbench leaderboards"


def registered_defense(name: str) -> Any:
    """The Defense class registered under ``name`` here, or ``None`` (e.g. a plugin that is
    not installed where the site is built)."""
    from bench.registry import DEFENSES

    try:
        return DEFENSES.get(name)
    except RegistryError:
        return None


def environment() -> jinja2.Environment:
    """The Jinja2 environment of the site's templates (HTML autoescaped, strict)."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("bench.site", "templates"),
        autoescape=jinja2.select_autoescape(("html",)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def build_site(
    store: Store,
    out_dir: str | Path,
    *,
    spec_name: str | None = None,
    rank_by: str = "upper",
    title: str = DEFAULT_TITLE,
    defense_class: DefenseLookup | None = None,
) -> Path:
    """Write the static site of every board in ``store`` under ``out_dir``; returns the path
    of its ``index.html``.

    ``spec_name`` and ``rank_by`` select and rank the boards as
    :func:`bench.leaderboard.publish` does. ``defense_class(name)`` returns the Defense
    class whose metadata (docstring, capabilities, ``citation``) the row pages show, or
    ``None``; the default looks it up in the defense registry.

    Raises :class:`ConfigError` when the store holds no finished cells (for ``spec_name``).
    """
    out = Path(out_dir)
    # the site's copy of the data; raises ConfigError when there is nothing to publish
    data = publish(store, out / "data", spec_name=spec_name, rank_by=rank_by)
    boards = build_boards(store, spec_name=spec_name, rank_by=rank_by)
    cells = store.cells(spec_name=spec_name)
    lookup = defense_class or registered_defense
    env = environment()
    common = {"site_title": title, "version": __version__, "spec_name": spec_name}

    def render(template: str, root: str, **context: Any) -> bytes:
        text = env.get_template(template).render(root=root, **common, **context)
        return text.encode("utf-8")

    files: dict[str, bytes] = {}
    summaries = []
    for board in boards:
        ctx = board_context(board, cells)
        summaries.append(ctx["board"])
        slug = ctx["board"]["slug"]
        files[f"{slug}.html"] = render("board.html", "", **ctx)
        for page in ctx["pages"]:
            row_ctx = row_context(board, page, lookup)
            files[f"{slug}/{page.slug}.html"] = render("row.html", "../", **row_ctx)
    files["index.html"] = render("index.html", "", boards=summaries)
    static = resources.files("bench.site").joinpath("static")
    for name in STATIC_FILES:
        files[f"static/{name}"] = static.joinpath(name).read_bytes()

    written = {rel: atomic_write_bytes(out / rel, content) for rel, content in files.items()}
    written.update({path.relative_to(out).as_posix(): path for path in data})
    _prune(out, written)
    return out / "index.html"


def _prune(out: Path, written: Mapping[str, Path]) -> None:
    """Delete what the previous build wrote and this one did not; record this build's files."""
    manifest = out / MANIFEST
    previous: list[str] = []
    with contextlib.suppress(FileNotFoundError):
        previous = manifest.read_text(encoding="utf-8").splitlines()
    for rel in previous:
        path = PurePosixPath(rel)
        if rel in written or path.is_absolute() or ".." in path.parts or not rel:
            continue
        target = out / path
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        for parent in target.parents:  # drop directories the deletion emptied
            if parent == out or out not in parent.parents:
                break
            with contextlib.suppress(OSError):
                parent.rmdir()
    atomic_write_bytes(manifest, "".join(f"{rel}\n" for rel in sorted(written)).encode())
