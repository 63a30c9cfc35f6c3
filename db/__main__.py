"""``python -m db ...``: the feedback-store commands on their own (``python -m hive`` has them too)."""

from db.cli import main

raise SystemExit(main())
