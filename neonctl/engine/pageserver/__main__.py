from neonctl.engine.pageserver.service import main

main()
