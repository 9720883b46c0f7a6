from streamfilter.cli import main

raise SystemExit(main())
