"""Hospital data as hospitals keep it: OMOP CDM v5.4 databases (issue #18).

``cohort`` runs a study's [data.omop] cohort definition on a site's database (DuckDB or
PostgreSQL, through SQLAlchemy Core: generated, parameterized, read-only SQL) and fingerprints
what it yields; ``source`` hands the rows to the data layer (a table for the tabular and
survival tasks, a long table for the sequence task). ``physionet`` turns PhysioNet 2012 set A
into one DuckDB database per ICU type, the demo sites; ``schema`` holds the CDM tables' DDL;
the concept mapping is package data (``physionet_concepts.csv``, ``omop_concepts.csv``),
documented in docs/omop.md.
"""

from fedmed.data.omop.physionet import SITES, BuiltSite, build_physionet_omop

__all__ = ["SITES", "BuiltSite", "build_physionet_omop"]
