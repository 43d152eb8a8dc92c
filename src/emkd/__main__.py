from emkd.cli import main

raise SystemExit(main())
