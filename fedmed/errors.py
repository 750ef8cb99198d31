"""The few errors fedmed raises on purpose.

Each message says what is wrong AND what to do about it, because the person reading it is a
hospital data steward or a researcher, not the author of the code. Keep the hierarchy small.
"""

from __future__ import annotations


class FedmedError(Exception):
    """Base class: anything fedmed reports to a user as a one-line error."""


class ConfigError(FedmedError):
    """A run or site configuration is wrong (unknown key, bad value, missing file)."""


class DataError(FedmedError):
    """A site's table fails validation; the message names the file, column and rows."""


class PrivacyBudgetExceeded(FedmedError):
    """A site would spend more privacy budget than its own cap allows."""


class UpdateRejected(FedmedError):
    """A model update failed validation at the coordinator and was not aggregated."""


class PolicyViolation(FedmedError):
    """A site's own policy refuses the request (unapproved plan, too few rows, no DP, ...).

    Its message is written to be sent to the coordinator as is: it names the site and the rule,
    never a path or a row.
    """


class StudyFailed(FedmedError):
    """A study ended without a model fit to release (nothing aggregated, NaN/Inf weights).

    Its metrics are written (status "failed", with the cause); no model file is written or signed.
    """
