from palm_rlhf.cli.main import main

raise SystemExit(main())
