"""The data layer: models, connection, migrations and error translation.

Offers: `open_database(cfg)` (binds every model in this process), the models
(`from appliance.db.models import User, Task, ...`), `migrate()`, and the
errors `DatabaseError`, `DatabaseUnavailable`, `ConstraintConflict` (AppErrors) with `translated()`.
"""

from appliance.db.connection import describe, engine_name, open_database, open_for_role
from appliance.db.errors import ConstraintConflict, DatabaseError, DatabaseUnavailable, translated
from appliance.db.migrations import current_version, migrate, pending
from appliance.db.models import database

__all__ = [
    "ConstraintConflict",
    "DatabaseError",
    "DatabaseUnavailable",
    "current_version",
    "database",
    "describe",
    "engine_name",
    "migrate",
    "open_database",
    "open_for_role",
    "pending",
    "translated",
]
