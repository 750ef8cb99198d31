"""The OMOP CDM v5.4 tables a demo site's database holds, as DuckDB DDL.

Column names, order, types and NOT NULL follow OHDSI's own DuckDB DDL for CDM v5.4
(OHDSI/CommonDataModel, inst/ddl/5.4/duckdb/OMOPCDM_duckdb_5.4_ddl.sql), so any tool written
against the CDM reads these files. Note that DuckDB reads OHDSI's ``NUMERIC`` as DECIMAL(18,3):
a value with more than 3 decimals would be rounded, so the builder refuses one (set A has
none) rather than store a different number. Only the tables the demo fills are created (plus
``concept`` and ``cdm_source``); a site that needs the rest adds them from the OHDSI DDL.

The statements are constants: no value from the data is ever formatted into SQL.
"""

from __future__ import annotations

TABLES: dict[str, str] = {
    "person": """
        person_id integer NOT NULL,
        gender_concept_id integer NOT NULL,
        year_of_birth integer NOT NULL,
        month_of_birth integer NULL,
        day_of_birth integer NULL,
        birth_datetime TIMESTAMP NULL,
        race_concept_id integer NOT NULL,
        ethnicity_concept_id integer NOT NULL,
        location_id integer NULL,
        provider_id integer NULL,
        care_site_id integer NULL,
        person_source_value varchar(50) NULL,
        gender_source_value varchar(50) NULL,
        gender_source_concept_id integer NULL,
        race_source_value varchar(50) NULL,
        race_source_concept_id integer NULL,
        ethnicity_source_value varchar(50) NULL,
        ethnicity_source_concept_id integer NULL""",
    "observation_period": """
        observation_period_id integer NOT NULL,
        person_id integer NOT NULL,
        observation_period_start_date date NOT NULL,
        observation_period_end_date date NOT NULL,
        period_type_concept_id integer NOT NULL""",
    "visit_occurrence": """
        visit_occurrence_id integer NOT NULL,
        person_id integer NOT NULL,
        visit_concept_id integer NOT NULL,
        visit_start_date date NOT NULL,
        visit_start_datetime TIMESTAMP NULL,
        visit_end_date date NOT NULL,
        visit_end_datetime TIMESTAMP NULL,
        visit_type_concept_id integer NOT NULL,
        provider_id integer NULL,
        care_site_id integer NULL,
        visit_source_value varchar(50) NULL,
        visit_source_concept_id integer NULL,
        admitted_from_concept_id integer NULL,
        admitted_from_source_value varchar(50) NULL,
        discharged_to_concept_id integer NULL,
        discharged_to_source_value varchar(50) NULL,
        preceding_visit_occurrence_id integer NULL""",
    "measurement": """
        measurement_id integer NOT NULL,
        person_id integer NOT NULL,
        measurement_concept_id integer NOT NULL,
        measurement_date date NOT NULL,
        measurement_datetime TIMESTAMP NULL,
        measurement_time varchar(10) NULL,
        measurement_type_concept_id integer NOT NULL,
        operator_concept_id integer NULL,
        value_as_number NUMERIC NULL,
        value_as_concept_id integer NULL,
        unit_concept_id integer NULL,
        range_low NUMERIC NULL,
        range_high NUMERIC NULL,
        provider_id integer NULL,
        visit_occurrence_id integer NULL,
        visit_detail_id integer NULL,
        measurement_source_value varchar(50) NULL,
        measurement_source_concept_id integer NULL,
        unit_source_value varchar(50) NULL,
        unit_source_concept_id integer NULL,
        value_source_value varchar(50) NULL,
        measurement_event_id integer NULL,
        meas_event_field_concept_id integer NULL""",
    "death": """
        person_id integer NOT NULL,
        death_date date NOT NULL,
        death_datetime TIMESTAMP NULL,
        death_type_concept_id integer NULL,
        cause_concept_id integer NULL,
        cause_source_value varchar(50) NULL,
        cause_source_concept_id integer NULL""",
    "care_site": """
        care_site_id integer NOT NULL,
        care_site_name varchar(255) NULL,
        place_of_service_concept_id integer NULL,
        location_id integer NULL,
        care_site_source_value varchar(50) NULL,
        place_of_service_source_value varchar(50) NULL""",
    "cdm_source": """
        cdm_source_name varchar(255) NOT NULL,
        cdm_source_abbreviation varchar(25) NOT NULL,
        cdm_holder varchar(255) NOT NULL,
        source_description TEXT NULL,
        source_documentation_reference varchar(255) NULL,
        cdm_etl_reference varchar(255) NULL,
        source_release_date date NOT NULL,
        cdm_release_date date NOT NULL,
        cdm_version varchar(10) NULL,
        cdm_version_concept_id integer NOT NULL,
        vocabulary_version varchar(20) NOT NULL""",
    "concept": """
        concept_id integer NOT NULL,
        concept_name varchar(255) NOT NULL,
        domain_id varchar(20) NOT NULL,
        vocabulary_id varchar(20) NOT NULL,
        concept_class_id varchar(20) NOT NULL,
        standard_concept varchar(1) NULL,
        concept_code varchar(50) NOT NULL,
        valid_start_date date NOT NULL,
        valid_end_date date NOT NULL,
        invalid_reason varchar(1) NULL""",
}

# CDM tables the PhysioNet demo does not fill (set A has no diagnoses or observations),
# created only when a database is written with rows for them (the tests' synthetic CDM): same
# source and rules.
OPTIONAL_TABLES: dict[str, str] = {
    "condition_occurrence": """
        condition_occurrence_id integer NOT NULL,
        person_id integer NOT NULL,
        condition_concept_id integer NOT NULL,
        condition_start_date date NOT NULL,
        condition_start_datetime TIMESTAMP NULL,
        condition_end_date date NULL,
        condition_end_datetime TIMESTAMP NULL,
        condition_type_concept_id integer NOT NULL,
        condition_status_concept_id integer NULL,
        stop_reason varchar(20) NULL,
        provider_id integer NULL,
        visit_occurrence_id integer NULL,
        visit_detail_id integer NULL,
        condition_source_value varchar(50) NULL,
        condition_source_concept_id integer NULL,
        condition_status_source_value varchar(50) NULL""",
    "observation": """
        observation_id integer NOT NULL,
        person_id integer NOT NULL,
        observation_concept_id integer NOT NULL,
        observation_date date NOT NULL,
        observation_datetime TIMESTAMP NULL,
        observation_type_concept_id integer NOT NULL,
        value_as_number NUMERIC NULL,
        value_as_string varchar(60) NULL,
        value_as_concept_id integer NULL,
        qualifier_concept_id integer NULL,
        unit_concept_id integer NULL,
        provider_id integer NULL,
        visit_occurrence_id integer NULL,
        visit_detail_id integer NULL,
        observation_source_value varchar(50) NULL,
        observation_source_concept_id integer NULL,
        unit_source_value varchar(50) NULL,
        qualifier_source_value varchar(50) NULL,
        value_source_value varchar(50) NULL,
        observation_event_id integer NULL,
        obs_event_field_concept_id integer NULL""",
}


def create_statements(optional: tuple[str, ...] = ()) -> list[str]:
    """One CREATE TABLE per CDM table, in TABLES' order, then the ``optional`` ones named."""
    chosen = {**TABLES, **{name: OPTIONAL_TABLES[name] for name in optional}}
    return [f"CREATE TABLE {name} ({columns}\n)" for name, columns in chosen.items()]


def columns_of(table: str) -> list[str]:
    """The CDM column names of ``table``, in order (what a frame must hold to be inserted)."""
    ddl = TABLES.get(table) or OPTIONAL_TABLES[table]
    return [line.split()[0] for line in ddl.strip().splitlines()]
