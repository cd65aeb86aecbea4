from segcal.cli import main

raise SystemExit(main())
