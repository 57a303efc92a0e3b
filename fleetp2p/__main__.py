from fleetp2p.cli.main import main

raise SystemExit(main())
