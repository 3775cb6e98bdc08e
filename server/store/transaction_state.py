"""Where a database connection's transaction stands, as each driver reports it.

The backends differ after an error inside a transaction: SQLite keeps the transaction
usable after a failed statement but rolls the whole transaction back on some errors
(https://sqlite.org/lang_transaction.html, "Response To Errors Within A Transaction");
PostgreSQL keeps it open but refuses every statement until ROLLBACK or ROLLBACK TO
SAVEPOINT (https://www.postgresql.org/docs/current/tutorial-transactions.html). The store
asks this after each operation of a batch and before committing a write.
"""

from __future__ import annotations

import enum


class TransactionState(enum.Enum):
    """A connection's transaction after some statements ran in it."""

    #: Usable: statements run and a COMMIT saves them.
    OPEN = "open"
    #: Aborted by an error (PostgreSQL): only ROLLBACK or ROLLBACK TO SAVEPOINT runs; a
    #: COMMIT would silently roll everything back.
    FAILED = "failed"
    #: None open (PostgreSQL): none began yet (psycopg begins one at the first statement) or
    #: it ended; the next statement begins a new one. A write transaction, which begins by
    #: taking the writers' lock, is lost then.
    IDLE = "idle"
    #: Gone: the database rolled it back (SQLite after SQLITE_FULL/IOERR, a ROLLBACK) or
    #: the connection broke; later statements would run outside it.
    LOST = "lost"
