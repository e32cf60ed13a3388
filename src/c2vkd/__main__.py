from c2vkd.cli import main

raise SystemExit(main())
