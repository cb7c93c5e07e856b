from neonctl.engine.safekeeper.service import main

main()
