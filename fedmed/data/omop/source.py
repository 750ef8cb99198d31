"""A site's dataset read from its OMOP CDM database, handed to the existing data layer.

fedmed.data.read_site_table comes here when the study has a [data.omop] section: the site's
path is then a database URL. The cohort definition yields one extraction (cohort.extract);
the tabular and survival tasks get its wide table, checked and split by
fedmed.data.table.validate_table like a file's; the sequence task gets its long table, binned
and split by fedmed.data.series.series_table like PhysioNet's CSV. So what a task does with
the rows is the same whichever source they came from.
"""

from __future__ import annotations

import numpy as np

from fedmed.config import RunConfig, SiteSpec
from fedmed.data.arrays import ArrayTable
from fedmed.data.omop import cohort
from fedmed.data.sources import resolve_site_path
from fedmed.data.table import SiteTable, validate_table
from fedmed.errors import ConfigError, DataError


def read_omop_site(cfg: RunConfig, site: SiteSpec, target: str) -> SiteTable | ArrayTable:
    """One site's cohort as the task of outcome kind ``target`` reads it."""
    omop = cfg.data.omop
    extraction = extracted(cfg, site)
    schema = cfg.data.schema
    if target == "series":
        from fedmed.data.series import require_variables, series_table

        require_variables(cfg)
        long = cohort.long_table(extraction, omop)
        ids = extraction.cohort["person_id"].to_numpy(np.int64)  # sorted by the query
        y = cohort.labels(extraction, omop).loc[ids].to_numpy(np.float32)
        return series_table(cfg, site, long, ids, y, extraction.origin)
    if target == "survival":
        columns = {"time": schema.time, "event": schema.event}
    else:
        columns = {"target": schema.target}
    table = cohort.wide_table(extraction, omop, columns)
    return validate_table(site.name, table, schema, extraction.origin, target=target)


def extracted(cfg: RunConfig, site: SiteSpec) -> cohort.Extraction:
    """The site's cohort (a non-empty extraction), from the database URL that is its path;
    what training and ``fedmed stats`` both start from."""
    url = resolve_site_path(site.path)
    if not cohort.is_database_url(url):
        raise ConfigError(
            f"site '{site.name}': with [data.omop] its path is a database URL "
            f"(duckdb:///FILE.duckdb or postgresql://USER@HOST/DB), not {site.path!r}"
        )
    omop = cfg.data.omop
    extraction = cohort.extract(url, site.credentials, omop)
    if extraction.cohort.empty:
        raise DataError(
            f"{extraction.origin}: the cohort is empty (no {cohort.describe_index(omop)} "
            "meets data.omop's age and observation criteria); check the concept ids and criteria"
        )
    return extraction
