from omnigen.cli.main import main

raise SystemExit(main())
