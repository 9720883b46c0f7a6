from streamfilter.commands import main

raise SystemExit(main())
