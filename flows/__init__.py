"""Prefect flows of fkd: they orchestrate ``fkd_core`` and hold no model or image logic of their own."""

import os

# With no PREFECT_API_URL, a flow run starts Prefect's temporary (ephemeral) API server. Its first start in a
# fresh PREFECT_HOME creates the SQLite database and runs every migration, which takes 15-40 s on a small,
# busy machine; Prefect's default wait of 20 s made fresh-machine runs fail with "Timed out while attempting
# to connect to ephemeral Prefect API server". Wait longer unless the user chose a value. Set here, before
# any flow module imports prefect, because Prefect reads its settings from the environment at import.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")

# Prefect's anonymous telemetry stays off unless the user turns it on (on these machines every first start
# otherwise logs "Failed to send telemetry" errors): DO_NOT_TRACK for the client, analytics off for the
# temporary API server the CLI starts.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
