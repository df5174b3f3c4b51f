"""`python -m lorakit ...`: the same as the `lorakit` command."""

from lorakit.cli import main

raise SystemExit(main())
