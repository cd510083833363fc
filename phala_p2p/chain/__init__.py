"""chain room: transactions, ledger state machine, BFT consensus machine, block store.

Everything here is sans-IO (the store uses sqlite3). Importing the package registers the core
transaction kinds with the ledger.
"""

from phala_p2p.chain import ledger as _ledger  # noqa: F401  (registers the core tx kinds)
