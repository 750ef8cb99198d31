"""Site datasets: read (sources), check and split (table), spread a demo table (partition).

Nothing here knows about tasks or Flower: the task decides which outcome a site's rows carry
(``target``) and calls ``read_site_table`` with it (fedmed.tasks.load_site_table).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fedmed.config import RunConfig, SiteSpec
from fedmed.data.arrays import ArrayTable
from fedmed.data.sources import load_site_frame
from fedmed.data.table import OUTCOMES, SiteData, SiteTable, validate_table
from fedmed.errors import ConfigError

if TYPE_CHECKING:
    from fedmed.data.text import TextTable

__all__ = [
    "ArrayTable",
    "SiteData",
    "SiteTable",
    "clear_file_caches",
    "read_site_table",
    "site_spec",
]

Reader = Callable[[RunConfig, SiteSpec], "ArrayTable | TextTable"]


def site_spec(cfg: RunConfig, name: str) -> SiteSpec:
    """The configured site called ``name``; an unknown name lists the valid ones."""
    for site in cfg.sites:
        if site.name == name:
            return site
    raise ConfigError(f"unknown site '{name}'; configured sites: {', '.join(cfg.site_names)}")


def readers() -> dict[str, Reader]:
    """Outcome kind (``Task.target``) -> the reader of its sites (imported on first use).

    Text sites are read in two steps (fedmed.data.text): this reader checks and splits the
    texts; their token ids need the study's vocabulary (``encode_table``).
    """
    from fedmed.data.images import read_image_site
    from fedmed.data.series import read_series_site
    from fedmed.data.text import read_text_table

    return {"image": read_image_site, "series": read_series_site, "text": read_text_table}


def read_site_table(
    cfg: RunConfig, site: SiteSpec, target: str
) -> SiteTable | ArrayTable | TextTable:
    """One site's rows for an outcome of kind ``target`` (raw units, split into train/test)."""
    if cfg.data.omop.active:  # the site's path is an OMOP CDM database
        from fedmed.data.omop.source import read_omop_site

        return read_omop_site(cfg, site, target)
    if target not in OUTCOMES:  # images, series: their own reader
        return readers()[target](cfg, site)
    frame, origin = load_site_frame(cfg, site)
    return validate_table(site.name, frame, cfg.data.schema, origin, target=target)


def clear_file_caches() -> None:
    """Forget the image and series files read so far (they are cached by path)."""
    from fedmed.data.images import load_images
    from fedmed.data.series import load_long, load_outcomes

    for cached in (load_images, load_long, load_outcomes):
        cached.cache_clear()
