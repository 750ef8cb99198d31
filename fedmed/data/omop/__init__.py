"""Hospital data as hospitals keep it: OMOP CDM v5.4 databases (issue #18, first step).

``physionet`` turns PhysioNet 2012 set A into one DuckDB database per ICU type, so that the
next steps (reading a cohort from a site's OMOP database, ``fedmed stats``) have real CDM data
to run on. ``schema`` holds the CDM tables' DDL; the concept mapping is package data
(``physionet_concepts.csv``, ``omop_concepts.csv``), documented in docs/omop.md.
"""

from fedmed.data.omop.physionet import SITES, BuiltSite, build_physionet_omop

__all__ = ["SITES", "BuiltSite", "build_physionet_omop"]
