"""Site datasets: read (sources), check and split (table), spread a demo table (partition)."""

from __future__ import annotations

from fedmed.config import RunConfig, SiteSpec
from fedmed.data.arrays import ArrayTable, readers
from fedmed.data.sources import load_site_frame
from fedmed.data.table import OUTCOMES, SiteData, SiteTable, prepare, validate_table

__all__ = [
    "ArrayTable",
    "SiteData",
    "SiteTable",
    "clear_file_caches",
    "load_site_data",
    "load_site_table",
    "site_spec",
]


def site_spec(cfg: RunConfig, name: str) -> SiteSpec:
    """The configured site called ``name``; an unknown name lists the valid ones."""
    for site in cfg.sites:
        if site.name == name:
            return site
    from fedmed.errors import ConfigError

    raise ConfigError(f"unknown site '{name}'; configured sites: {', '.join(cfg.site_names)}")


def load_site_table(cfg: RunConfig, site: SiteSpec) -> SiteTable | ArrayTable:
    """Read and validate one site's table (raw units, split into train/test).

    The study's task is checked against the config first (e.g. survival needs a time and an
    event column) and decides which columns are the outcome; every path that touches site data
    (preflight, sites, baselines) comes through here, so a bad combination fails before training.
    """
    from fedmed.tasks import get_task

    task = get_task(cfg.task)
    task.check(cfg)
    if task.target not in OUTCOMES:  # images, series: their own reader (fedmed.data.arrays)
        return readers()[task.target](cfg, site)
    frame, origin = load_site_frame(cfg, site)
    return validate_table(site.name, frame, cfg.data.schema, origin, target=task.target)


def clear_file_caches() -> None:
    """Forget the image and series files read so far (they are cached by path)."""
    from fedmed.data.images import load_images
    from fedmed.data.series import load_long, load_outcomes

    for cached in (load_images, load_long, load_outcomes):
        cached.cache_clear()


def load_site_data(cfg: RunConfig, site: SiteSpec) -> SiteData:
    """Model-ready arrays for one site, preprocessing fitted on its own train split."""
    table = load_site_table(cfg, site)
    if isinstance(table, ArrayTable):
        return table.data
    return prepare(table, cfg.data.schema)
